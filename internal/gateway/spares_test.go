package gateway

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestSparesRunEveryJob: every job runs, also when more are given at once
// than the idle bound, and a job may wait for a later one (as a pipeline
// tail waiting for a place may): spares never queues a job behind busy
// goroutines.
func TestSparesRunEveryJob(t *testing.T) {
	stop := make(chan struct{})
	defer close(stop)
	s := newSpares(stop)
	s.maxIdle = 2
	const n = 200
	release := make(chan struct{})
	var ran atomic.Int32
	var wg sync.WaitGroup
	wg.Add(n + 1)
	for range n {
		s.Go(func() {
			defer wg.Done()
			<-release // every earlier job waits for the last one
			ran.Add(1)
		})
	}
	s.Go(func() { defer wg.Done(); close(release) })
	wg.Wait()
	if got := ran.Load(); got != n {
		t.Fatalf("%d of %d jobs ran", got, n)
	}
	// The burst left at most maxIdle goroutines idle; the others ended.
	waitFor(t, func() bool { return s.idle.Load() <= s.maxIdle })
	if got := s.idle.Load(); got < 1 {
		t.Fatalf("%d idle goroutines after the burst, want some kept for the next run", got)
	}
}

// TestSparesReuse: a job given while a goroutine is idle runs on it, not
// on a new one.
func TestSparesReuse(t *testing.T) {
	stop := make(chan struct{})
	defer close(stop)
	s := newSpares(stop)
	done := make(chan struct{})
	s.Go(func() { close(done) })
	<-done
	waitFor(t, func() bool { return s.idle.Load() == 1 })
	done = make(chan struct{})
	s.Go(func() { close(done) })
	<-done
	waitFor(t, func() bool { return s.idle.Load() == 1 })
	if got := s.idle.Load(); got != 1 {
		t.Fatalf("%d idle goroutines, want the one reused", got)
	}
}

// TestSparesAfterStop: once stop is closed, idle goroutines end and jobs
// still run (a closing connection's pipeline must finish).
func TestSparesAfterStop(t *testing.T) {
	stop := make(chan struct{})
	s := newSpares(stop)
	done := make(chan struct{})
	s.Go(func() { close(done) })
	<-done
	waitFor(t, func() bool { return s.idle.Load() == 1 })
	close(stop)
	for range 3 {
		done := make(chan struct{})
		s.Go(func() { close(done) })
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("a job given after stop did not run")
		}
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

// deepJob uses about 12 KiB of stack, as a pipeline's tail does through
// Pebble.
//
//go:noinline
func deepJob(depth int) byte {
	var b [256]byte
	b[depth%len(b)] = byte(depth)
	if depth == 0 {
		return b[0]
	}
	return deepJob(depth-1) + b[(depth*7)%len(b)]
}

// BenchmarkSpares compares running a deep job on a new goroutine each
// time (as pipelines did) with running it on spares.
func BenchmarkSpares(b *testing.B) {
	run := func(b *testing.B, start func(func())) {
		done := make(chan struct{})
		job := func() { deepJob(40); done <- struct{}{} }
		b.ReportAllocs()
		for b.Loop() {
			start(job)
			<-done
		}
	}
	b.Run("go", func(b *testing.B) { run(b, func(f func()) { go f() }) })
	b.Run("spares", func(b *testing.B) {
		stop := make(chan struct{})
		defer close(stop)
		s := newSpares(stop)
		run(b, s.Go)
	})
}
