package main

import (
	"context"
	"net"
	"os"
	"testing"
	"time"
)

func TestTally(t *testing.T) {
	tl := newTally()
	tl.accept(1)
	if !tl.deliver(1) {
		t.Error("first delivery of 1 not counted")
	}
	if !tl.deliver(2) { // delivered before its PUBACK
		t.Error("first delivery of 2 not counted")
	}
	tl.accept(2)
	tl.accept(3) // never delivered
	if tl.deliver(1) || tl.deliver(2) {
		t.Error("a second delivery counted as new")
	}
	if lost, dups := tl.lost(); lost != 1 || dups != 2 {
		t.Errorf("lost %d, duplicates %d; want 1, 2", lost, dups)
	}
}

// TestAgainstBroker runs a short closed loop and a short fixed rate
// against an MQTT broker on 127.0.0.1:1883 (mosquitto here), or
// $MQTT_PAIRS_BROKER (host:port). The broker is a reference for the
// bench, not something courier needs, so without one the test is skipped.
func TestAgainstBroker(t *testing.T) {
	addr := os.Getenv("MQTT_PAIRS_BROKER")
	if addr == "" {
		addr = "127.0.0.1:1883"
	}
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Skipf("no MQTT broker on %s (set MQTT_PAIRS_BROKER): %v", addr, err)
	}
	c.Close()
	for _, o := range []options{
		{broker: "tcp://" + addr, pid: os.Getpid(), pairs: 3, inflight: 4, size: 64, duration: 300 * time.Millisecond},
		{broker: "tcp://" + addr, pairs: 2, inflight: 1, size: 16, rate: 200, duration: 300 * time.Millisecond},
	} {
		res, err := run(context.Background(), o)
		if err != nil {
			t.Fatalf("%+v: %v", o, err)
		}
		if res.Delivered == 0 || res.Delivered != res.Accepted || res.Lost != 0 || res.Duplicates != 0 {
			t.Errorf("%s: accepted %d, delivered %d, lost %d, duplicates %d", res.Params, res.Accepted, res.Delivered, res.Lost, res.Duplicates)
		}
		if (o.pid != 0) != (res.ServerCPUUsPerMsg != nil) {
			t.Errorf("%s: CPU per message %v with pid %d", res.Params, res.ServerCPUUsPerMsg, o.pid)
		}
	}
	if _, err := run(context.Background(), options{broker: "tcp://127.0.0.1:1", pairs: 1, inflight: 1, size: 64, duration: time.Second}); err == nil {
		t.Error("a run against no broker succeeded")
	}
	if _, err := run(context.Background(), options{broker: "tcp://" + addr, pairs: 1, inflight: 1, size: 8}); err == nil {
		t.Error("size 8 accepted")
	}
}
