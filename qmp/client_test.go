package qmp_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/lockstepvm/lockstep/qmp"
	"github.com/lockstepvm/lockstep/qmp/qmptest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// liveness bounds waits that only fail when something hangs.
const liveness = 10 * time.Second

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), liveness)
	t.Cleanup(cancel)
	return ctx
}

func dial(t *testing.T, s *qmptest.Server, opts ...qmp.Option) *qmp.Client {
	t.Helper()
	c, err := qmp.Dial(ctxT(t), s.Network(), s.Addr(), opts...)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestHandshake(t *testing.T) {
	noOOB := `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}`
	tests := []struct {
		name     string
		tcp      bool
		greeting string
		opts     []qmp.Option
		wantOOB  bool
		wantVer  string
		wantArgs string
	}{
		{name: "unix offers oob", greeting: qmptest.DefaultGreeting, wantOOB: true, wantVer: "11.1.3", wantArgs: `{"enable":["oob"]}`},
		{name: "tcp offers oob", tcp: true, greeting: qmptest.DefaultGreeting, wantOOB: true, wantVer: "11.1.3", wantArgs: `{"enable":["oob"]}`},
		{name: "no oob offered", greeting: noOOB, wantOOB: false, wantVer: "7.2.22", wantArgs: `{}`},
		{name: "oob declined", greeting: qmptest.DefaultGreeting, opts: []qmp.Option{qmp.WithoutOOB()}, wantOOB: false, wantVer: "11.1.3", wantArgs: `{}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := qmptest.New(t)
			if tc.tcp {
				s = qmptest.NewTCP(t)
			}
			s.SetGreeting(tc.greeting)
			c := dial(t, s, tc.opts...)
			if c.OOB() != tc.wantOOB {
				t.Errorf("OOB() = %v, want %v", c.OOB(), tc.wantOOB)
			}
			if v := c.Greeting().Version.String(); v != tc.wantVer {
				t.Errorf("version %s, want %s", v, tc.wantVer)
			}
			reqs := s.RequestsFor("qmp_capabilities")
			if len(reqs) != 1 {
				t.Fatalf("qmp_capabilities sent %d times", len(reqs))
			}
			if got := compact(reqs[0].Args); got != tc.wantArgs {
				t.Errorf("qmp_capabilities args %s, want %s", got, tc.wantArgs)
			}
		})
	}
}

func compact(b []byte) string {
	var buf bytes.Buffer
	if len(b) == 0 {
		return ""
	}
	if err := json.Compact(&buf, b); err != nil {
		return "!" + string(b)
	}
	return buf.String()
}

// Events that QEMU sends before answering qmp_capabilities must not be taken for the answer.
func TestEventsBeforeCapabilitiesReply(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("qmp_capabilities", func(c *qmptest.Conn, r *qmptest.Request) {
		c.Event("STOP", nil, time.Now())
		c.Send(`{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}`)
		c.ReplyError(r, "GenericError", "capabilities refused on purpose")
	})
	_, err := qmp.Dial(ctxT(t), "unix", s.Addr())
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Desc != "capabilities refused on purpose" {
		t.Fatalf("Dial error = %v; want the capabilities error, not an event taken as the reply", err)
	}

	s2 := qmptest.New(t)
	s2.Handle("qmp_capabilities", func(c *qmptest.Conn, r *qmptest.Request) {
		c.Event("STOP", nil, time.Now())
		c.Reply(r, struct{}{})
	})
	c := dial(t, s2)
	if err := c.Execute(ctxT(t), "qmp_capabilities", nil, nil); err != nil {
		t.Fatalf("a second call after the handshake: %v", err)
	}
}

// In-band commands carry no id: QEMU answers them one at a time in the order it read them, and
// 200 concurrent callers each get their own reply by that order.
func TestExecuteConcurrentInOrder(t *testing.T) {
	s := qmptest.New(t)
	const n = 200
	s.Handle("echo", func(c *qmptest.Conn, r *qmptest.Request) {
		var a struct{ N int }
		_ = r.DecodeArgs(&a)
		c.Reply(r, map[string]int{"n": a.N})
	})
	c := dial(t, s, qmp.WithMaxInflight(n))
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var out struct{ N int }
			if err := c.Execute(ctxT(t), "echo", map[string]int{"n": i}, &out); err != nil {
				errs <- err
				return
			}
			if out.N != i {
				errs <- fmt.Errorf("call %d got the reply of %d", i, out.N)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, r := range s.RequestsFor("echo") {
		if len(r.ID) != 0 {
			t.Fatalf("an in-band command was sent with id %s", r.ID)
		}
	}
}

// Out-of-band replies overtake in-band ones and each other: they are matched by id.
func TestOOBRepliesOvertake(t *testing.T) {
	s := qmptest.New(t)
	release := make(chan struct{})
	s.Handle("slow", func(c *qmptest.Conn, r *qmptest.Request) {
		<-release
		c.Reply(r, "slow")
	})
	const n = 5
	var mu sync.Mutex
	var held []*qmptest.Request
	s.Handle("fast", func(c *qmptest.Conn, r *qmptest.Request) {
		mu.Lock()
		held = append(held, r)
		batch := held
		mu.Unlock()
		if len(batch) < n {
			return
		}
		for i := len(batch) - 1; i >= 0; i-- {
			var a struct{ N int }
			_ = batch[i].DecodeArgs(&a)
			c.Reply(batch[i], a.N)
		}
	})
	c := dial(t, s)
	slow := make(chan error, 1)
	go func() {
		var got string
		err := c.Execute(ctxT(t), "slow", nil, &got)
		if err == nil && got != "slow" {
			err = fmt.Errorf("slow got %q", got)
		}
		slow <- err
	}()
	waitFor(t, func() bool { return len(s.RequestsFor("slow")) == 1 })
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var got int
			if err := c.ExecuteOOB(ctxT(t), "fast", map[string]int{"n": i}, &got); err != nil || got != i {
				errs <- fmt.Errorf("out-of-band call %d: %d %v", i, got, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	close(release)
	if err := <-slow; err != nil {
		t.Fatal(err)
	}
	for _, r := range s.RequestsFor("fast") {
		if len(r.ID) == 0 {
			t.Fatal("an out-of-band command was sent without an id")
		}
	}
}

// A call whose context ended leaves its place in the order: its late reply is consumed, not
// given to the next call.
func TestAbandonedCallKeepsTheOrder(t *testing.T) {
	s := qmptest.New(t)
	release := make(chan struct{})
	s.Handle("late", func(c *qmptest.Conn, r *qmptest.Request) {
		<-release
		c.Reply(r, "late")
	})
	s.Handle("next", qmptest.Return("next"))
	c := dial(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := c.Execute(ctx, "late", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("late: %v", err)
	}
	close(release)
	var got string
	if err := c.Execute(ctxT(t), "next", nil, &got); err != nil || got != "next" {
		t.Fatalf("next got %q %v", got, err)
	}
	if st := c.Stats(); st.UnknownReplies != 1 || st.Timeouts != 1 || st.Refused != 0 {
		t.Errorf("stats %+v, want the late reply and one timeout", st)
	}
}

// Stats count the commands QEMU refused and those past their deadline, not those cancelled.
func TestStatsCountRefusalsAndTimeouts(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("bad", func(c *qmptest.Conn, r *qmptest.Request) { c.ReplyError(r, "GenericError", "no") })
	s.Handle("slow", func(c *qmptest.Conn, r *qmptest.Request) {})
	s.Handle("ok", qmptest.Return(struct{}{}))
	c := dial(t, s)
	for range 2 {
		if err := c.Execute(ctxT(t), "bad", nil, nil); err == nil {
			t.Fatal("bad: no error")
		}
	}
	if err := c.Execute(ctxT(t), "ok", nil, nil); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(context.Background())
	cancel()
	_ = c.Execute(cctx, "slow", nil, nil)
	if st := c.Stats(); st.Refused != 2 || st.Timeouts != 0 {
		t.Fatalf("stats %+v, want 2 refused and no timeout (a cancel is not one)", st)
	}
}

func TestErrorsAreTyped(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("object-del", qmptest.Fail("DeviceNotFound", "object 'comp0' not found"))
	c := dial(t, s)
	err := c.ObjectDel(ctxT(t), "comp0")
	var qe *qmp.Error
	if !errors.As(err, &qe) {
		t.Fatalf("error %v is not a *qmp.Error", err)
	}
	if qe.Class != "DeviceNotFound" || qe.Desc != "object 'comp0' not found" {
		t.Errorf("got %+v", qe)
	}
	var ce *qmp.CommandError
	if !errors.As(err, &ce) || ce.Command != "object-del" {
		t.Errorf("error %v does not name the command", err)
	}
	if !qmp.IsClass(err, "DeviceNotFound") {
		t.Error("IsClass false")
	}
	err = c.Execute(ctxT(t), "no-such-command", nil, nil)
	if !qmp.IsClass(err, "CommandNotFound") {
		t.Errorf("unknown command: %v", err)
	}
}

func TestCancelledCallReturnsAndLateReplyIsDiscarded(t *testing.T) {
	s := qmptest.New(t)
	release := make(chan struct{})
	s.Handle("slow", func(c *qmptest.Conn, r *qmptest.Request) {
		select {
		case <-release:
		case <-c.Done():
			return
		}
		c.Reply(r, "late")
	})
	s.Handle("fast", qmptest.Return("fast"))
	c := dial(t, s)

	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- c.Execute(ctx, "slow", nil, nil) }()
	waitFor(t, func() bool { return len(s.RequestsFor("slow")) == 1 })
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled call returned %v", err)
		}
	case <-time.After(liveness):
		t.Fatal("cancelled call did not return")
	}
	// A deadline works the same way.
	dctx, dcancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer dcancel()
	if err := c.Execute(dctx, "slow", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("expired call returned %v", err)
	}
	close(release) // both late replies now arrive
	var got string
	if err := c.Execute(ctxT(t), "fast", nil, &got); err != nil || got != "fast" {
		t.Fatalf("call after late replies: %q, %v", got, err)
	}
	if st := c.Stats(); st.UnknownReplies != 2 {
		t.Errorf("UnknownReplies = %d, want 2", st.UnknownReplies)
	}
}

func TestOOBWhileInBandIsStuck(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("migrate", qmptest.Hang())
	s.Handle("yank", qmptest.Return(struct{}{}))
	c := dial(t, s)
	stuck := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { stuck <- c.Migrate(ctx, "tcp:127.0.0.1:1") }()
	waitFor(t, func() bool { return len(s.RequestsFor("migrate")) == 1 })
	if err := c.Yank(ctxT(t), qmp.YankInstance{Type: "migration"}); err != nil {
		t.Fatalf("yank while migrate is stuck: %v", err)
	}
	y := s.RequestsFor("yank")
	if len(y) != 1 || !y[0].OOB {
		t.Fatalf("yank was not sent out of band: %+v", y)
	}
	if got := compact(y[0].Args); got != `{"instances":[{"type":"migration"}]}` {
		t.Errorf("yank args %s", got)
	}
	select {
	case err := <-stuck:
		t.Fatalf("the stuck call returned: %v", err)
	default:
	}
	cancel()
	if err := <-stuck; !errors.Is(err, context.Canceled) {
		t.Fatalf("stuck call: %v", err)
	}
}

func TestOOBNotNegotiated(t *testing.T) {
	s := qmptest.New(t)
	c := dial(t, s, qmp.WithoutOOB())
	err := c.ExecuteOOB(ctxT(t), "yank", nil, nil)
	if !errors.Is(err, qmp.ErrNoOOB) {
		t.Fatalf("got %v, want ErrNoOOB", err)
	}
	if n := len(s.RequestsFor("yank")); n != 0 {
		t.Fatalf("yank reached QEMU %d times", n)
	}
}

// In-band calls beyond the OOB reserve wait in the client instead of filling QEMU's queue, so an
// OOB command can still be read by QEMU.
func TestInflightLimitKeepsRoomForOOB(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("stuck", qmptest.Hang())
	s.Handle("yank", qmptest.Return(struct{}{}))
	c := dial(t, s)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); _ = c.Execute(ctx, "stuck", nil, nil) }()
	}
	waitFor(t, func() bool { return len(s.RequestsFor("stuck")) == 7 })
	time.Sleep(20 * time.Millisecond)
	if n := len(s.RequestsFor("stuck")); n != 7 {
		t.Errorf("%d in-band commands reached QEMU, want at most 7", n)
	}
	if err := c.Yank(ctxT(t), qmp.YankInstance{Type: "migration"}); err != nil {
		t.Errorf("yank: %v", err)
	}
	cancel()
	wg.Wait()
}

func TestSubscribersNeverBlock(t *testing.T) {
	s := qmptest.New(t)
	const n = 1000
	base := time.Unix(1700000000, 123456000)
	s.Handle("burst", func(c *qmptest.Conn, r *qmptest.Request) {
		for i := 0; i < n; i++ {
			c.Event("STOP", map[string]int{"i": i}, base.Add(time.Duration(i)*time.Microsecond))
		}
		c.Event("RESUME", nil, base)
		c.Reply(r, struct{}{})
	})
	c := dial(t, s)
	abandoned := c.SubscribeLimit(10) // never read: must cost at most 10 events and block nothing
	stops := c.Subscribe(qmp.EventStop)
	all := c.Subscribe()
	if err := c.Execute(ctxT(t), "burst", nil, nil); err != nil {
		t.Fatalf("a command behind %d unread events: %v", n, err)
	}
	for i := 0; i < n; i++ {
		ev, err := stops.Next(ctxT(t))
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		var d struct{ I int }
		if err := ev.DecodeData(&d); err != nil || d.I != i {
			t.Fatalf("event %d out of order: %+v %v", i, d, err)
		}
		want := base.Add(time.Duration(i) * time.Microsecond)
		if !ev.Time.Equal(want) {
			t.Fatalf("event %d time %v, want %v", i, ev.Time, want)
		}
	}
	if stops.Len() != 0 {
		t.Errorf("filtered subscriber got %d extra events (RESUME should not pass)", stops.Len())
	}
	if got := all.Len(); got != n+1 {
		t.Errorf("unfiltered subscriber queued %d, want %d", got, n+1)
	}
	if got := abandoned.Len(); got != 10 {
		t.Errorf("abandoned subscriber queued %d, want 10", got)
	}
	if got := abandoned.Dropped(); got != n+1-10 {
		t.Errorf("abandoned subscriber dropped %d, want %d", got, n+1-10)
	}
	abandoned.Close()
	if _, err := abandoned.Next(ctxT(t)); !errors.Is(err, qmp.ErrSubscriptionClosed) {
		t.Errorf("Next after Close: %v", err)
	}
}

func TestSubscriptionDrainsAfterConnectionLoss(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("die", func(c *qmptest.Conn, r *qmptest.Request) {
		c.Event("COLO_EXIT", map[string]string{"mode": "primary", "reason": "error"}, time.Now())
		c.Close()
	})
	c := dial(t, s)
	sub := c.Subscribe(qmp.EventColoExit)
	select {
	case <-sub.Ready():
		t.Fatal("Ready before any event")
	default:
	}
	err := c.Execute(ctxT(t), "die", nil, nil)
	if !errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("call on a dying connection: %v", err)
	}
	ev, err := sub.Next(ctxT(t))
	if err != nil || ev.Name != "COLO_EXIT" {
		t.Fatalf("queued event lost at connection loss: %v %v", ev, err)
	}
	var d qmp.ColoExitData
	if err := ev.DecodeData(&d); err != nil || d.Reason != qmp.ColoExitError || d.Mode != qmp.ColoModePrimary {
		t.Fatalf("COLO_EXIT data %+v %v", d, err)
	}
	if _, err := sub.Next(ctxT(t)); !errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("Next after the drain: %v", err)
	}
	late := c.Subscribe()
	if _, err := late.Next(ctxT(t)); !errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("subscription on a closed client: %v", err)
	}
}

// A reply far over 64 KiB arrives whole, and the bytes a call returned are never overwritten by
// later reads.
func TestLongLinesAndOwnedBytes(t *testing.T) {
	s := qmptest.New(t)
	big := strings.Repeat("x", 1<<20)
	s.Handle("big", qmptest.Return(map[string]string{"blob": big}))
	s.Handle("small", qmptest.Return(map[string]string{"blob": "yyyyyyyy"}))
	c := dial(t, s)
	var first json.RawMessage
	if err := c.Execute(ctxT(t), "big", nil, &first); err != nil {
		t.Fatalf("1 MiB reply: %v", err)
	}
	snapshot := append([]byte(nil), first...)
	for i := 0; i < 50; i++ {
		var r json.RawMessage
		if err := c.Execute(ctxT(t), "small", nil, &r); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(first, snapshot) {
		t.Fatal("the bytes of an earlier reply changed after later reads")
	}
	var v struct{ Blob string }
	if err := json.Unmarshal(first, &v); err != nil || v.Blob != big {
		t.Fatalf("1 MiB reply corrupted: len %d, %v", len(v.Blob), err)
	}
}

func TestConnectionLossFailsPendingCalls(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("hang", qmptest.Hang())
	c := dial(t, s)
	const n = 5
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() { errs <- c.Execute(context.Background(), "hang", nil, nil) }()
	}
	waitFor(t, func() bool { return len(s.RequestsFor("hang")) == n })
	conn, err := s.WaitConn(liveness)
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	for i := 0; i < n; i++ {
		select {
		case err := <-errs:
			if !errors.Is(err, qmp.ErrClosed) {
				t.Errorf("pending call: %v, want ErrClosed", err)
			}
		case <-time.After(liveness):
			t.Fatal("a pending call hung after connection loss")
		}
	}
	select {
	case <-c.Done():
	case <-time.After(liveness):
		t.Fatal("Done not closed")
	}
	if err := c.Err(); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("Err() = %v", err)
	}
	if err := c.Execute(ctxT(t), "hang", nil, nil); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("call after loss: %v", err)
	}
}

// Close returns at once even while calls wait on a peer that went silent.
func TestCloseNeverHangs(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("hang", qmptest.Hang())
	c := dial(t, s)
	errs := make(chan error, 3)
	for i := 0; i < 3; i++ {
		go func() { errs <- c.Execute(context.Background(), "hang", nil, nil) }()
	}
	waitFor(t, func() bool { return len(s.RequestsFor("hang")) == 3 })
	closed := make(chan struct{})
	go func() { c.Close(); c.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(liveness):
		t.Fatal("Close hung")
	}
	for i := 0; i < 3; i++ {
		if err := <-errs; !errors.Is(err, qmp.ErrClosed) {
			t.Errorf("pending call after Close: %v", err)
		}
	}
}

func TestFDPassing(t *testing.T) {
	s := qmptest.New(t)
	got := make(chan string, 1)
	s.Handle("getfd", func(c *qmptest.Conn, r *qmptest.Request) {
		if len(r.Files) != 1 {
			c.ReplyError(r, "GenericError", fmt.Sprintf("got %d fds", len(r.Files)))
			return
		}
		f := r.Files[0]
		defer f.Close()
		b, _ := io.ReadAll(f)
		got <- string(b)
		c.Reply(r, struct{}{})
	})
	c := dial(t, s)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	if _, err := pw.WriteString("through SCM_RIGHTS"); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	if err := c.GetFD(ctxT(t), "mig0", pr); err != nil {
		t.Fatalf("GetFD: %v", err)
	}
	if msg := <-got; msg != "through SCM_RIGHTS" {
		t.Fatalf("QEMU read %q from the passed fd", msg)
	}
	if a := compact(s.RequestsFor("getfd")[0].Args); a != `{"fdname":"mig0"}` {
		t.Errorf("getfd args %s", a)
	}

	tcp := qmptest.NewTCP(t)
	ct := dial(t, tcp)
	if err := ct.GetFD(ctxT(t), "x", pr); !errors.Is(err, qmp.ErrNoFDPassing) {
		t.Fatalf("GetFD over TCP: %v", err)
	}
}

func TestBadPeers(t *testing.T) {
	tests := []struct {
		name    string
		raw     func(c *qmptest.Conn)
		wantErr error
		timeout time.Duration
	}{
		{name: "greeting not QMP", raw: func(c *qmptest.Conn) { c.Send(`SSH-2.0-OpenSSH_9.2`); <-c.Done() }, wantErr: qmp.ErrNotQMP},
		{name: "greeting is JSON but not a greeting", raw: func(c *qmptest.Conn) { c.Send(`{"return": {}}`); <-c.Done() }, wantErr: qmp.ErrNotQMP},
		{name: "greeting without version", raw: func(c *qmptest.Conn) { c.Send(`{"QMP": {"capabilities": []}}`); <-c.Done() }, wantErr: qmp.ErrNotQMP},
		{name: "silent peer", raw: func(c *qmptest.Conn) { <-c.Done() }, wantErr: context.DeadlineExceeded, timeout: 50 * time.Millisecond},
		{name: "closes at once", raw: func(c *qmptest.Conn) {}, wantErr: io.EOF},
		{name: "malformed capabilities reply", raw: func(c *qmptest.Conn) {
			c.Send(qmptest.DefaultGreeting)
			c.Send(`{"return": {}, "id": `)
			c.Send(`not json`)
			<-c.Done()
		}, wantErr: qmp.ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := qmptest.New(t)
			s.OnConnect(tc.raw)
			timeout := tc.timeout
			if timeout == 0 {
				timeout = liveness
			}
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			c, err := qmp.Dial(ctx, "unix", s.Addr())
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Dial error %v, want %v", err, tc.wantErr)
			}
		})
	}
}

func TestMalformedLineClosesCleanly(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("x", func(c *qmptest.Conn, r *qmptest.Request) { c.Send(`{"return": [1, 2`) })
	s.Handle("hang", qmptest.Hang())
	c := dial(t, s)
	other := make(chan error, 1)
	go func() { other <- c.Execute(context.Background(), "hang", nil, nil) }()
	waitFor(t, func() bool { return len(s.RequestsFor("hang")) == 1 })
	// The malformed reply arrives on the same connection: the dispatcher runs in-band commands
	// one by one, so send x out of band to get past the hanging one.
	err := c.ExecuteOOB(ctxT(t), "x", nil, nil)
	if !errors.Is(err, qmp.ErrClosed) || !errors.Is(err, qmp.ErrMalformed) {
		t.Fatalf("call answered by a malformed line: %v", err)
	}
	if err := <-other; !errors.Is(err, qmp.ErrMalformed) {
		t.Fatalf("other pending call: %v", err)
	}
}

func TestUnknownIDAndIDlessErrors(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("noise", func(c *qmptest.Conn, r *qmptest.Request) {
		c.Send(`{"return": {}, "id": "not-ours"}`)
		c.Send(`{"return": {}, "id": 987654321}`)
		c.Reply(r, "ok")
		// Without an id and with no in-band call waiting: matches nothing.
		c.Send(`{"error": {"class": "GenericError", "desc": "JSON parse error"}}`)
	})
	s.Handle("after", qmptest.Return("after"))
	c := dial(t, s)
	var got string
	if err := c.Execute(ctxT(t), "noise", nil, &got); err != nil || got != "ok" {
		t.Fatalf("%q %v", got, err)
	}
	waitFor(t, func() bool { return c.Stats().UnknownReplies == 3 })
	if err := c.Execute(ctxT(t), "after", nil, &got); err != nil || got != "after" {
		t.Fatalf("after: %q %v", got, err)
	}
	if c.Err() != nil {
		t.Errorf("connection ended: %v", c.Err())
	}
}

func TestSilentAfterHandshake(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("query-status", qmptest.Hang())
	c := dial(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if _, err := c.QueryStatus(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("QueryStatus on a silent QEMU: %v", err)
	}
	if c.Err() != nil {
		t.Fatalf("a timed-out call must not end the connection: %v", c.Err())
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(liveness)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached")
		}
		time.Sleep(time.Millisecond)
	}
}
