package server

import (
	"fmt"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/cache"
	"github.com/courier-im/courier/internal/cluster"
)

// openDeviceCache returns the account store behind the device-list cache
// (package accounts/cache): every send and receipt looks up one to three
// users' devices, which then cost a map read instead of a query. On NATS
// the node also joins the cluster's device bus, so that a device linked or
// removed through another node's API is dropped from this node's cache
// (and this node's changes from theirs). Without an account store (a
// worker) or with the cache turned off, it returns the store as it is.
func (s *Server) openDeviceCache() (accounts.Store, error) {
	if s.accounts == nil || s.cfg.DeviceCacheSize < 0 {
		return s.accounts, nil
	}
	opts := cache.Options{Size: s.cfg.DeviceCacheSize, TTL: s.cfg.DeviceCacheTTL, Registry: s.registry}
	var bus *cluster.DeviceBus
	if s.cl.nc != nil {
		b, err := cluster.NewDeviceBus(cluster.DeviceBusConfig{
			Conn: s.cl.nc, Subject: s.cfg.Cluster.DevicesSubject, Node: s.cfg.Cluster.Node, Logger: s.log,
		})
		if err != nil {
			return nil, err
		}
		bus, opts.OnChange = b, b.Changed
	}
	c, err := cache.New(s.accounts, opts)
	if err != nil {
		return nil, fmt.Errorf("device cache: %w", err)
	}
	if bus != nil {
		if err := bus.Start(c); err != nil {
			return nil, err
		}
		s.owned = append(s.owned, bus.Close)
	}
	return c, nil
}
