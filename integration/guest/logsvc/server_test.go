package logsvc

import (
	"bufio"
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/integration/guest/wire"
)

// startServer serves l on a loopback port until the test ends.
func startServer(t *testing.T, l *Log) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- (&Server{Log: l, Logf: t.Logf}).Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ln.Addr().String()
}

// rawConn sends raw request bytes and reads reply lines.
type rawConn struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawConn{t: t, c: c, r: bufio.NewReader(c)}
}

func (rc *rawConn) send(s string) {
	rc.t.Helper()
	if _, err := rc.c.Write([]byte(s)); err != nil {
		rc.t.Fatal(err)
	}
}

func (rc *rawConn) expect(want string) string {
	rc.t.Helper()
	line, err := rc.r.ReadString('\n')
	if err != nil {
		rc.t.Fatalf("reading reply (want %q): %v", want, err)
	}
	line = strings.TrimSuffix(line, "\n")
	if want != "" && line != want && !(strings.HasSuffix(want, "*") && strings.HasPrefix(line, strings.TrimSuffix(want, "*"))) {
		rc.t.Fatalf("reply %q, want %q", line, want)
	}
	return line
}

func TestProtocolPipelined(t *testing.T) {
	dev, _ := tempDevice(t, 64)
	l, err := Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	rc := dialRaw(t, startServer(t, l))
	// All requests in one segment: the replies must come in request order.
	rc.send("W 1 first record\nW 2 \nW 4 gap\nW 2 dup\nP\nX\nQ\nD\nW 3 a  b \n")
	rc.expect("A 1")
	rc.expect("A 2")
	rc.expect("E out of sequence: want 3, got 4")
	rc.expect("E out of sequence: want 3, got 2")
	rc.expect("P")
	rc.expect("E unknown request")
	want := wire.Summary{Count: 2, Last: 2, Checksum: wire.EmptyChecksum.Add(1, []byte("first record")).Add(2, nil)}
	rc.expect(strings.TrimSuffix(want.Line(), "\n"))
	rc.expect(strings.TrimSuffix(want.Line(), "\n"))
	rc.expect("A 3")
	// The payload is kept byte for byte, spaces included.
	if got := l.Records()[2].Payload; string(got) != "a  b " {
		t.Fatalf("payload of record 3 = %q", got)
	}
	// Malformed writes and an overlong line are rejected, the connection
	// goes on.
	rc.send("W\nW x y\nW 4\n")
	rc.expect("E *")
	rc.expect("E bad record number*")
	rc.expect("E *")
	rc.send("W 4 " + strings.Repeat("z", 2*wire.MaxLine) + "\nW 4 ok\n")
	rc.expect("E request line longer than*")
	rc.expect("A 4")
	rc.send("W 5 " + strings.Repeat("z", wire.MaxPayload+1) + "\n")
	rc.expect("E wire: payload of*")
}

func TestServeStopsConnections(t *testing.T) {
	l, err := Open(nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- (&Server{Log: l}).Serve(ctx, ln) }()
	rc := dialRaw(t, ln.Addr().String())
	rc.send("P\n")
	rc.expect("P")
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve returned %v after cancel", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel with a connection open")
	}
	// The open connection was closed by the server.
	if _, err := rc.r.ReadString('\n'); err == nil {
		t.Fatal("connection still open after Serve returned")
	}
}
