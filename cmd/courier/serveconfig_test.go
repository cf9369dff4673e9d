package main

import (
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func settingsFlags() (*flag.FlagSet, map[string]any) {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	v := map[string]any{
		"role":     fs.String("role", "gateway,api,worker", ""),
		"nats":     fs.String("nats", "", ""),
		"redis":    fs.String("redis", "", ""),
		"replicas": fs.Int("replicas", 1, ""),
		"node":     fs.String("node", "", ""),
		"log-json": fs.Bool("log-json", false, ""),
		"ttl":      fs.Duration("session-ttl", 30*time.Second, ""),
		"config":   fs.String("config", "", ""),
	}
	return fs, v
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "courier.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// A flag beats the environment, which beats the config file, which beats
// the default.
func TestSettingsPrecedence(t *testing.T) {
	cfg := writeConfig(t, "role: worker\nnats: [nats://a:4222, nats://b:4222]\nredis: redis://file:6379/0\nreplicas: 3\nnode: from-file\nlog-json: true\nsession-ttl: 5s\n")
	t.Setenv("COURIER_REDIS", "redis://env:6379/0")
	t.Setenv("COURIER_NODE", "from-env")
	t.Setenv("COURIER_REPLICAS", "")
	fs, v := settingsFlags()
	if err := fs.Parse([]string{"--node", "from-flag", "--config", cfg}); err != nil {
		t.Fatal(err)
	}
	if err := applySettings(fs, *v["config"].(*string)); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]any{
		"role": "worker", "nats": "nats://a:4222,nats://b:4222", "redis": "redis://env:6379/0",
		"node": "from-flag", "replicas": 3, "log-json": true, "ttl": 5 * time.Second,
	} {
		var got any
		switch p := v[name].(type) {
		case *string:
			got = *p
		case *int:
			got = *p
		case *bool:
			got = *p
		case *time.Duration:
			got = *p
		}
		if got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// Without flags, environment or file, the defaults stand; the config
// file can also come from $COURIER_CONFIG.
func TestSettingsDefaultsAndConfigEnv(t *testing.T) {
	fs, v := settingsFlags()
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	if err := applySettings(fs, ""); err != nil {
		t.Fatal(err)
	}
	if *v["role"].(*string) != "gateway,api,worker" || *v["replicas"].(*int) != 1 {
		t.Fatalf("defaults changed: %v %v", *v["role"].(*string), *v["replicas"].(*int))
	}
	t.Setenv("COURIER_CONFIG", writeConfig(t, "replicas: 5\n"))
	fs, v = settingsFlags()
	fs.Parse(nil)
	if err := applySettings(fs, ""); err != nil {
		t.Fatal(err)
	}
	if *v["replicas"].(*int) != 5 {
		t.Fatalf("replicas from $COURIER_CONFIG's file = %d", *v["replicas"].(*int))
	}
}

// Unknown keys, bad values and unreadable files are errors naming their
// source.
func TestSettingsErrors(t *testing.T) {
	for _, tc := range []struct {
		file, env, want string
	}{
		{file: "rolez: worker\n", want: `unknown key "rolez"`},
		{file: "config: other.yaml\n", want: `unknown key "config"`},
		{file: "replicas: three\n", want: "replicas"},
		{file: "session-ttl: 5\n", want: "session-ttl"},
		{file: "nats: {a: b}\n", want: "nats"},
		{file: "role: [gateway, [api]]\n", want: "nested"},
		{file: "- just\n- a list\n", want: "config"},
		{file: "role: worker\nrole: api\n", want: "config"},
		{env: "x", want: "$COURIER_REPLICAS"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			fs, _ := settingsFlags()
			fs.Parse(nil)
			path := ""
			if tc.file != "" {
				path = writeConfig(t, tc.file)
			}
			if tc.env != "" {
				t.Setenv("COURIER_REPLICAS", tc.env)
			}
			err := applySettings(fs, path)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want one mentioning %q", err, tc.want)
			}
		})
	}
	fs, _ := settingsFlags()
	fs.Parse(nil)
	if err := applySettings(fs, filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Fatal("a missing config file was accepted")
	}
}
