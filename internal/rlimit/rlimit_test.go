package rlimit

import (
	"syscall"
	"testing"
)

func TestRaiseSetsSoftToHard(t *testing.T) {
	var before syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &before); err != nil {
		t.Fatal(err)
	}
	// Lower the soft limit (always allowed) so that Raise has work to do,
	// and put it back afterwards.
	lowered := before
	lowered.Cur = min(before.Max, 256)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lowered); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &before) })

	l, err := Raise()
	if err != nil {
		t.Fatal(err)
	}
	if l.Soft != before.Max || l.Hard != before.Max {
		t.Fatalf("after Raise: soft %d hard %d; want both %d", l.Soft, l.Hard, before.Max)
	}
	if l.Raised != (lowered.Cur != before.Max) {
		t.Fatalf("Raised = %v after lowering the soft limit to %d of %d", l.Raised, lowered.Cur, before.Max)
	}
	var now syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &now); err != nil {
		t.Fatal(err)
	}
	if now.Cur != before.Max {
		t.Fatalf("soft limit is %d after Raise; want %d", now.Cur, before.Max)
	}

	// A second call finds nothing to do.
	again, err := Raise()
	if err != nil || again.Raised || again.Soft != before.Max {
		t.Fatalf("second Raise: %+v, %v", again, err)
	}
}

func TestConns(t *testing.T) {
	for _, c := range []struct{ soft, want uint64 }{
		{0, 0}, {Reserved, 0}, {Reserved + 1, 1}, {20000, 20000 - Reserved},
	} {
		if got := (Limit{Soft: c.soft}).Conns(); got != c.want {
			t.Errorf("Conns with soft limit %d = %d; want %d", c.soft, got, c.want)
		}
	}
}
