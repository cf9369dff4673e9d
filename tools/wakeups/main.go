// Command wakeups counts the goroutine wake-ups in a Go runtime execution
// trace, by the stack of the goroutine that woke another one, so that the
// hand-offs a message costs can be counted:
//
//	curl -o t.out 'http://127.0.0.1:18091/debug/pprof/trace?seconds=1'  # courier serve --pprof
//	cd tools/wakeups && go run . [-n 25] [-depth 8] ../../t.out
//
// It prints the trace's span, the number of times a P started running,
// and the wake-ups (a goroutine going from waiting to runnable) grouped by
// the waker's stack, runtime and sync frames left out. It is a module of
// its own so that the trace reader (golang.org/x/exp/trace) stays out of
// the server's dependencies.
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"sort"
	"strings"

	"golang.org/x/exp/trace"
)

func main() {
	top := flag.Int("n", 25, "stacks to print")
	depth := flag.Int("depth", 8, "frames per stack")
	flag.Parse()
	if flag.NArg() != 1 {
		log.Fatal("usage: wakeups [-n N] [-depth D] TRACE")
	}
	f, err := os.Open(flag.Arg(0))
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	r, err := trace.NewReader(f)
	if err != nil {
		log.Fatal(err)
	}
	by := map[string]int{}
	total, procStarts := 0, 0
	var first, last trace.Time
	for {
		ev, err := r.ReadEvent()
		if err == io.EOF {
			break
		}
		if err != nil {
			log.Fatal(err)
		}
		if first == 0 {
			first = ev.Time()
		}
		last = ev.Time()
		if ev.Kind() != trace.EventStateTransition {
			continue
		}
		st := ev.StateTransition()
		switch st.Resource.Kind {
		case trace.ResourceProc:
			if _, to := st.Proc(); to == trace.ProcRunning {
				procStarts++
			}
		case trace.ResourceGoroutine:
			if from, to := st.Goroutine(); from == trace.GoWaiting && to == trace.GoRunnable {
				total++
				by[frames(ev.Stack(), *depth)]++
			}
		}
	}
	fmt.Printf("span %v, P starts %d, wake-ups %d\n", last.Sub(first), procStarts, total)
	type count struct {
		stack string
		n     int
	}
	var counts []count
	for k, n := range by {
		counts = append(counts, count{k, n})
	}
	sort.Slice(counts, func(i, j int) bool { return counts[i].n > counts[j].n })
	for i, c := range counts {
		if i == *top {
			break
		}
		if c.stack == "" {
			c.stack = "(runtime)"
		}
		fmt.Printf("%8d  %s\n", c.n, c.stack)
	}
}

// frames names up to n frames of s, innermost first, without the runtime's
// and sync's own.
func frames(s trace.Stack, n int) string {
	var out []string
	for f := range s.Frames() {
		fn := strings.TrimPrefix(f.Func, "github.com/courier-im/courier/internal/")
		if strings.HasPrefix(fn, "runtime.") || strings.HasPrefix(fn, "sync.") || strings.HasPrefix(fn, "internal/sync.") {
			continue
		}
		out = append(out, fn)
		if len(out) == n {
			break
		}
	}
	return strings.Join(out, " < ")
}
