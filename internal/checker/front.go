package checker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync/atomic"
)

// Front is a small HTTP front for a cluster, standing in for its load
// balancer: WebSocket connections (/v1/ws) go to the gateways in turn,
// everything else to the api. The SDK takes one server URL; a checker run
// against a cluster started with deploy/local-cluster.sh (which has no load
// balancer) points it at a Front.
type Front struct {
	URL string // the front's base URL

	srv  *http.Server
	done chan error
}

// StartFront starts a Front on a free loopback port.
func StartFront(api string, gateways []string) (*Front, error) {
	if len(gateways) == 0 {
		return nil, errors.New("checker: front: no gateways")
	}
	apiURL, err := url.Parse(api)
	if err != nil || apiURL.Host == "" {
		return nil, fmt.Errorf("checker: front: bad api URL %q", api)
	}
	// A client going away mid-request is routine here; do not log it.
	quiet := log.New(io.Discard, "", 0)
	apiProxy := httputil.NewSingleHostReverseProxy(apiURL)
	apiProxy.ErrorLog = quiet
	var gws []*httputil.ReverseProxy
	for _, g := range gateways {
		u, err := url.Parse(g)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("checker: front: bad gateway URL %q", g)
		}
		gw := httputil.NewSingleHostReverseProxy(u)
		gw.ErrorLog = quiet
		gws = append(gws, gw)
	}
	var next atomic.Uint64
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/ws", func(w http.ResponseWriter, r *http.Request) {
		// ReverseProxy passes WebSocket upgrades through.
		gws[(next.Add(1)-1)%uint64(len(gws))].ServeHTTP(w, r)
	})
	mux.Handle("/", apiProxy)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	f := &Front{URL: "http://" + ln.Addr().String(), srv: &http.Server{Handler: mux}, done: make(chan error, 1)}
	go func() { f.done <- f.srv.Serve(ln) }()
	return f, nil
}

// Close stops the front and cuts the connections through it.
func (f *Front) Close() error {
	err := f.srv.Close()
	if e := <-f.done; !errors.Is(e, http.ErrServerClosed) {
		err = errors.Join(err, e)
	}
	return err
}

// Shutdown stops the front gracefully (WebSockets are cut, as by Close).
func (f *Front) Shutdown(ctx context.Context) error {
	f.srv.Shutdown(ctx)
	return f.Close()
}
