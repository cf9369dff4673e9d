package main

import (
	"context"
	"flag"
	"io"
	"strings"
	"testing"
)

func TestByteSize(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "4096": 4096, "512MiB": 512 << 20, "6GiB": 6 << 30, "1.5GiB": 3 << 29, "2G": 2 << 30,
		"1TiB": 1 << 40, "64KiB": 64 << 10, " 3 MiB ": 3 << 20, "100B": 100,
	} {
		var b byteSize
		if err := b.Set(in); err != nil || int64(b) != want {
			t.Errorf("Set(%q): %d, %v; want %d", in, b, err, want)
		}
	}
	for _, in := range []string{"", "lots", "-1GiB", "GiB", "5PiB", "1e30", "Inf"} {
		var b byteSize
		if err := b.Set(in); err == nil {
			t.Errorf("Set(%q) = %d, want an error", in, b)
		}
	}
	// From the environment, as every serve flag.
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var b byteSize
	fs.Var(&b, "max-memory", "")
	fs.Parse(nil)
	t.Setenv("COURIER_MAX_MEMORY", "2GiB")
	if err := applySettings(fs, ""); err != nil || b != 2<<30 {
		t.Fatalf("COURIER_MAX_MEMORY=2GiB: %d, %v", b, err)
	}
}

func TestAdmissionFlagsChecked(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--admit-watermark", "0"}, "--admit-watermark"},
		{[]string{"--admit-watermark", "1.2"}, "--admit-watermark"},
		{[]string{"--admit-cpu", "2"}, "CPU admission watermark"},
		{[]string{"--max-memory", "much"}, "max-memory"},
	} {
		args := append([]string{"--data", t.TempDir(), "--log-level", "error"}, tc.args...)
		err := runServe(context.Background(), args)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("serve %q: %v, want an error mentioning %q", tc.args, err, tc.want)
		}
	}
}
