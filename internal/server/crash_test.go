package server_test

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
)

// The crash test runs the server in a child process (this test binary,
// re-executed) so that it can be killed with SIGKILL.
const childEnv = "COURIER_CRASH_CHILD_DATA"

func TestMain(m *testing.M) {
	if dir := os.Getenv(childEnv); dir != "" {
		runChild(dir, os.Getenv("COURIER_CRASH_CHILD_ADDR"))
		return
	}
	os.Exit(m.Run())
}

func runChild(dir, addr string) {
	srv, err := server.New(server.Config{DataDir: dir, Addr: addr, Logger: servertest.Logger(), MinFreeBytes: 1})
	if err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	err = srv.Run(context.Background(), func(a net.Addr) { fmt.Println("READY", a.String()) })
	if err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
}

type child struct {
	cmd  *exec.Cmd
	addr string
}

func startChild(t *testing.T, dir, addr string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+dir, "COURIER_CRASH_CHILD_ADDR="+addr)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := bufio.NewScanner(out)
	ready := make(chan string, 1)
	go func() {
		for lines.Scan() {
			if a, ok := strings.CutPrefix(lines.Text(), "READY "); ok {
				ready <- a
			} else {
				t.Logf("child: %s", lines.Text())
			}
		}
	}()
	select {
	case a := <-ready:
		return &child{cmd: cmd, addr: a}
	case <-time.After(30 * time.Second):
		t.Fatal("child server did not start")
	}
	return nil
}

func (c *child) kill(t *testing.T) {
	t.Helper()
	if err := c.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	c.cmd.Wait()
}

// TestCrashLosesNothingAccepted kills the server with SIGKILL while
// messages are being accepted, several times, restarting it on the same
// data. Every message answered 202 Accepted must then be delivered exactly
// once; sends that got no answer are retried with the same client id and
// must be stored once, too.
func TestCrashLosesNothingAccepted(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test skipped in -short mode")
	}
	dir := t.TempDir()
	c := startChild(t, dir, "127.0.0.1:0")
	addr := c.addr
	base := "http://" + addr
	alice, bob := register(t, base, "alice"), register(t, base, "bob")

	var mu sync.Mutex
	accepted := map[string]string{} // client id -> server id
	unanswered := map[string]bool{}
	next := 0
	const rounds, senders = 3, 8
	client := &http.Client{Timeout: 10 * time.Second}
	send := func(id string) (string, bool) {
		body := fmt.Sprintf(`{"client_msg_id":%q,"to":"bob","payloads":[{"user":"bob","device":1,"payload":"aGk="}]}`, id)
		req, _ := http.NewRequest("POST", base+"/v1/messages", strings.NewReader(body))
		req.Header.Set("Authorization", alice.basic())
		resp, err := client.Do(req)
		if err != nil {
			return "", false
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			return "", false
		}
		var r struct {
			ServerID string `json:"server_id"`
		}
		if err := jsonDecode(resp.Body, &r); err != nil {
			return "", false
		}
		return r.ServerID, true
	}
	for round := range rounds {
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for range senders {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					mu.Lock()
					id := fmt.Sprint("m", next)
					next++
					unanswered[id] = true
					mu.Unlock()
					sid, ok := send(id)
					mu.Lock()
					if ok {
						accepted[id] = sid
						delete(unanswered, id)
					}
					mu.Unlock()
					if !ok {
						return // the server is gone
					}
				}
			}()
		}
		// Let some messages through, then kill at a random moment.
		deadline := time.Now().Add(20 * time.Second)
		for {
			mu.Lock()
			n := len(accepted)
			mu.Unlock()
			if n >= (round+1)*100 || time.Now().After(deadline) {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(time.Duration(rand.IntN(20)) * time.Millisecond)
		c.kill(t)
		close(stop)
		wg.Wait()
		c = startChild(t, dir, addr)
	}
	// Retry every send that got no answer, with the same client id.
	for id := range unanswered {
		sid, ok := send(id)
		if !ok {
			t.Fatalf("retry of %s not accepted", id)
		}
		if prev, seen := accepted[id]; seen && prev != sid {
			t.Fatalf("retry of %s: server id %s, first acceptance %s", id, sid, prev)
		}
		accepted[id] = sid
	}
	t.Logf("%d messages accepted across %d SIGKILLs", len(accepted), rounds)

	bc := dial(t, base, bob)
	got := map[string]int{}
	for {
		f := bc.next(20 * time.Second)
		if f.GetSynced() != nil {
			break
		}
		d := f.GetDeliver()
		if d == nil {
			continue
		}
		got[d.Envelope.ClientMsgId]++
		if sid, ok := accepted[d.Envelope.ClientMsgId]; ok && sid != d.Envelope.ServerId {
			t.Errorf("%s delivered with server id %s, accepted as %s", d.Envelope.ClientMsgId, d.Envelope.ServerId, sid)
		}
		bc.ack(d.Seq)
	}
	for id := range accepted {
		if got[id] != 1 {
			t.Errorf("accepted message %s delivered %d times", id, got[id])
		}
	}
	for id, n := range got {
		if _, ok := accepted[id]; !ok {
			t.Errorf("delivered %s (%d times), which was never sent", id, n)
		}
	}
}
