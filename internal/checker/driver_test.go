package checker_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/checker"
	"github.com/courier-im/courier/internal/servertest"
)

// run runs a conversation against srv and fails the test on any violation,
// printing the report.
func run(t *testing.T, srv *servertest.Server, cfg checker.Config) *checker.Result {
	t.Helper()
	cfg.Server = srv.URL
	cfg.AddDevice = func(_ context.Context, user string) (uint32, string, error) {
		id, cred := srv.AddDevice(t, user)
		return id, cred, nil
	}
	cfg.Logf = t.Logf
	d, err := checker.NewDriver(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := d.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Violations) > 0 {
		var buf bytes.Buffer
		checker.Report(&buf, res.Violations)
		t.Fatalf("seed %d:\n%s", cfg.Seed, buf.String())
	}
	if !res.Quiesced {
		t.Fatal("not every accepted message was delivered in time")
	}
	st := res.Stats
	if st.Accepted != cfg.Messages || st.Sends != cfg.Messages {
		t.Errorf("stats %+v: want %d sends and acceptances", st, cfg.Messages)
	}
	if st.Deliveries < st.Accepted {
		t.Errorf("stats %+v: fewer deliveries than messages", st)
	}
	t.Logf("stats %+v, %d reconnects, %d reads, %v", st, res.Reconnects, res.Reads, res.Elapsed.Round(time.Millisecond))
	return res
}

func TestCheckerSmall(t *testing.T) {
	srv := servertest.Start(t)
	run(t, srv, checker.Config{
		Users:          6,
		DevicesPerUser: 2,
		Messages:       300,
		Seed:           1,
		ReconnectRate:  0.05,
		ReadRate:       0.3,
		Duration:       90 * time.Second,
	})
}

func TestCheckerAcrossRestarts(t *testing.T) {
	srv := servertest.Start(t)
	restarts := 0
	run(t, srv, checker.Config{
		Users:          6,
		DevicesPerUser: 2,
		Messages:       300,
		Seed:           2,
		ReconnectRate:  0.05,
		ReadRate:       0.3,
		Duration:       90 * time.Second,
		Faults:         2,
		Fault: func(context.Context, int) error {
			srv.Restart(t)
			restarts++
			return nil
		},
	})
	if restarts != 2 {
		t.Errorf("%d restarts, want 2", restarts)
	}
}

func TestDriverConfig(t *testing.T) {
	for _, cfg := range []checker.Config{
		{Users: 3},
		{Server: "http://127.0.0.1:1", Users: 1},
		{Server: "http://127.0.0.1:1", Users: 3, DevicesPerUser: 2},
		{Server: "http://127.0.0.1:1", Users: 3, DevicesPerUser: 3},
		{Server: "http://127.0.0.1:1", Users: 3, Faults: 1},
		{Server: "http://127.0.0.1:1", Users: 3, Stalled: 2},
		{Server: "http://127.0.0.1:1", Users: 3, Stalled: -1},
		{Server: "http://127.0.0.1:1", Users: 3, BodySize: -1},
	} {
		if _, err := checker.NewDriver(cfg); err == nil {
			t.Errorf("NewDriver(%+v) accepted a bad config", cfg)
		}
	}
}

// TestCheckerThroughFront runs a conversation through a Front (the stand-in
// for a cluster's load balancer) whose api and gateways are one server:
// registration, HTTP sends and WebSockets all go through the proxy.
func TestCheckerThroughFront(t *testing.T) {
	srv := servertest.Start(t)
	f, err := checker.StartFront(srv.URL, []string{srv.URL, srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	front := *srv
	front.URL = f.URL
	run(t, &front, checker.Config{
		Users:          4,
		DevicesPerUser: 2,
		Messages:       150,
		Seed:           9,
		ReconnectRate:  0.05,
		ReadRate:       0.3,
		Duration:       90 * time.Second,
	})
	if _, err := checker.StartFront("::bad", []string{srv.URL}); err == nil {
		t.Error("StartFront accepted a bad api URL")
	}
	if _, err := checker.StartFront(srv.URL, nil); err == nil {
		t.Error("StartFront accepted no gateways")
	}
}
