package main

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	"go.yaml.in/yaml/v2"
)

const serveUsage = `usage: courier serve [flags]

Runs a courier node. With none of --nats, --redis and --postgres, a single
node on embedded backends: a Pebble mailbox and a SQLite account store in
the data directory; no external service is needed.

A cluster runs processes in any mix of roles (--role gateway,api,worker)
against shared backends: the mailbox on NATS JetStream (--nats, with
--replicas), the session directory on Redis (--redis), the accounts on
PostgreSQL (--postgres). GET /v1/health is liveness, GET /v1/ready
readiness (backends reachable, not draining); SIGTERM drains.

Every flag can also be set by the environment variable COURIER_<FLAG>
(upper case, '-' as '_': COURIER_ROLE, COURIER_NATS, COURIER_REDIS,
COURIER_POSTGRES, COURIER_NODE, COURIER_REPLICAS, ...) and by the YAML
file given with --config (or $COURIER_CONFIG), whose keys are the flag
names. A flag beats the environment, which beats the file, which beats the
default.

flags:
`

// envName is the environment variable of a flag: COURIER_MAX_PAYLOAD for
// max-payload.
func envName(flagName string) string {
	return "COURIER_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// applySettings fills the flags not given on the command line from the
// environment and then from the YAML config file (the --config flag, else
// $COURIER_CONFIG), so that a flag beats the environment, which beats the
// file, which beats the default. Unknown keys and bad values are errors
// that name their source.
func applySettings(fs *flag.FlagSet, configFlag string) error {
	onCmdline := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { onCmdline[f.Name] = true })

	path := configFlag
	if path == "" {
		path = os.Getenv(envName("config"))
	}
	file := map[string]string{}
	if path != "" {
		var err error
		if file, err = readConfig(fs, path); err != nil {
			return err
		}
	}
	var errs []string
	fs.VisitAll(func(f *flag.Flag) {
		if onCmdline[f.Name] || f.Name == "config" {
			return
		}
		if v, ok := os.LookupEnv(envName(f.Name)); ok && v != "" {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Sprintf("$%s=%q: %v", envName(f.Name), v, err))
			}
			return
		}
		if v, ok := file[f.Name]; ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Sprintf("config %s: %s: %q: %v", path, f.Name, v, err))
			}
		}
	})
	if len(errs) > 0 {
		return fmt.Errorf("bad settings:\n  %s", strings.Join(errs, "\n  "))
	}
	return nil
}

// readConfig reads a YAML mapping of flag names to values. A list becomes
// a comma-separated value (nats: [nats://a:4222, nats://b:4222]).
func readConfig(fs *flag.FlagSet, path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	var raw map[string]any
	if err := yaml.UnmarshalStrict(data, &raw); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	out := map[string]string{}
	var errs []string
	keys := make([]string, 0, len(raw))
	for k := range raw {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := raw[k]
		if k == "config" || fs.Lookup(k) == nil {
			errs = append(errs, fmt.Sprintf("unknown key %q (the keys are the flag names of courier serve)", k))
			continue
		}
		s, err := scalar(v)
		if err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", k, err))
			continue
		}
		out[k] = s
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("config %s:\n  %s", path, strings.Join(errs, "\n  "))
	}
	return out, nil
}

func scalar(v any) (string, error) {
	switch v := v.(type) {
	case nil:
		return "", nil
	case string, bool, int, int64, uint64, float64:
		return fmt.Sprint(v), nil
	case []any:
		parts := make([]string, len(v))
		for i, e := range v {
			s, err := scalar(e)
			if err != nil {
				return "", err
			}
			if _, nested := e.([]any); nested {
				return "", fmt.Errorf("nested lists are not settings")
			}
			parts[i] = s
		}
		return strings.Join(parts, ","), nil
	}
	return "", fmt.Errorf("want a value or a list of values, not %T", v)
}
