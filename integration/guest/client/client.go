// Package client talks to the test guest's workload service (see package
// wire for the protocol): it writes numbered records over one long-lived TCP
// connection and queries the service's summaries of its log, so that a test
// can check that every acknowledged record survived a failover.
package client

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lockstepvm/lockstep/integration/guest/wire"
)

// Summary describes the service's log: count, newest record and checksum.
type Summary = wire.Summary

// ServerError is an E reply: the service rejected the request and the
// connection remains usable.
type ServerError struct {
	Reason string
}

func (e *ServerError) Error() string { return "workload: " + e.Reason }

// ErrBroken is returned (wrapped) by every call on a connection that an
// earlier call left in an unknown state, for example by timing out between
// its request and its reply.
var ErrBroken = errors.New("connection broken by an earlier error")

// Client is one connection to the service. Its methods may be called from
// several goroutines; they are serialised, one request in flight at a time,
// because replies carry no request id.
type Client struct {
	mu     sync.Mutex
	conn   net.Conn
	r      *bufio.Reader
	buf    []byte
	broken error
}

// Dial connects to the service at addr (host:port).
func Dial(ctx context.Context, addr string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, r: bufio.NewReaderSize(conn, wire.MaxLine)}, nil
}

// New wraps a connection to the service that the caller dialed itself (for example from inside
// a network namespace).
func New(conn net.Conn) *Client {
	return &Client{conn: conn, r: bufio.NewReaderSize(conn, wire.MaxLine)}
}

// DialReady connects to the service at addr and pings it, retrying every
// interval until a ping is answered or ctx is done. It is how a test waits
// for a booting guest: QEMU's user-mode network forwarder accepts connections
// on the host before the guest listens, and closes them when the guest
// refuses, so only an answered ping shows that the service is up.
func DialReady(ctx context.Context, addr string, interval time.Duration) (*Client, error) {
	var d net.Dialer
	return DialReadyWith(ctx, d.DialContext, addr, interval)
}

// Dialer opens a connection, as net.Dialer's DialContext does; a test's dialer may open it
// from inside a network namespace.
type Dialer func(ctx context.Context, network, addr string) (net.Conn, error)

// DialReadyWith is DialReady with the connections opened by dial.
func DialReadyWith(ctx context.Context, dial Dialer, addr string, interval time.Duration) (*Client, error) {
	var last error
	for {
		c, err := dialPing(ctx, dial, addr, interval)
		if err == nil {
			return c, nil
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("workload at %s not ready: %w (last error: %v)", addr, ctx.Err(), last)
		case <-time.After(interval):
		}
	}
}

func dialPing(ctx context.Context, dial Dialer, addr string, interval time.Duration) (*Client, error) {
	// Bound each attempt, so that an attempt that the forwarder holds open
	// without an answer does not eat the whole wait; a cold guest answers a
	// ping within milliseconds once its service runs.
	actx, cancel := context.WithTimeout(ctx, max(interval, time.Second))
	defer cancel()
	conn, err := dial(actx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c := New(conn)
	if _, err := c.Ping(actx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Write appends record n with payload and waits for its acknowledgement,
// which the service sends only once the record is on its disk. An E reply is
// returned as a *ServerError.
func (c *Client) Write(ctx context.Context, n uint64, payload []byte) error {
	if err := wire.CheckPayload(payload); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf = wire.AppendWrite(c.buf[:0], n, payload)
	line, err := c.roundTrip(ctx, c.buf)
	if err != nil {
		return fmt.Errorf("write record %d: %w", n, err)
	}
	if want := "A " + strconv.FormatUint(n, 10); line != want {
		return c.breakConn(fmt.Errorf("write record %d: unexpected reply %q", n, line))
	}
	return nil
}

// Query returns the summary of the service's in-memory log.
func (c *Client) Query(ctx context.Context) (Summary, error) {
	return c.summary(ctx, "Q")
}

// QueryDisk returns the summary that the service computes by re-reading its
// records from its disk.
func (c *Client) QueryDisk(ctx context.Context) (Summary, error) {
	return c.summary(ctx, "D")
}

func (c *Client) summary(ctx context.Context, req string) (Summary, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	line, err := c.roundTrip(ctx, []byte(req+"\n"))
	if err != nil {
		return Summary{}, fmt.Errorf("query %s: %w", req, err)
	}
	s, err := wire.ParseSummary(line)
	if err != nil {
		return Summary{}, c.breakConn(fmt.Errorf("query %s: %w", req, err))
	}
	return s, nil
}

// Ping sends a ping and returns the round-trip time to its answer.
func (c *Client) Ping(ctx context.Context) (time.Duration, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	start := time.Now()
	line, err := c.roundTrip(ctx, []byte("P\n"))
	if err != nil {
		return 0, fmt.Errorf("ping: %w", err)
	}
	if line != "P" {
		return 0, c.breakConn(fmt.Errorf("ping: unexpected reply %q", line))
	}
	return time.Since(start), nil
}

// roundTrip sends req and reads one reply line, returned without its LF. An E
// reply is returned as a *ServerError. The caller holds c.mu.
func (c *Client) roundTrip(ctx context.Context, req []byte) (string, error) {
	if c.broken != nil {
		return "", fmt.Errorf("%w: %w", ErrBroken, c.broken)
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	// The deadline bounds the call when ctx has one; cancellation of ctx
	// moves it into the past, which unblocks the read or write at once.
	dl, _ := ctx.Deadline()
	if err := c.conn.SetDeadline(dl); err != nil {
		return "", c.breakConn(err)
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		c.conn.SetDeadline(time.Unix(1, 0))
		close(fired)
	})
	line, err := c.exchange(req)
	if !stop() {
		// Wait until the callback has set its deadline, so that it cannot
		// strike the next call; the next call sets its own deadline.
		<-fired
	}
	if err != nil {
		if cerr := ctxErr(ctx, dl, err); cerr != nil {
			err = fmt.Errorf("%w (%v)", cerr, err)
		}
		// The reply may still be on its way: the connection is out of step.
		return "", c.breakConn(err)
	}
	if reason, ok := strings.CutPrefix(line, "E "); ok {
		return "", &ServerError{Reason: reason}
	}
	return line, nil
}

// ctxErr returns the context error that caused err, if any. The connection's
// deadline is ctx's deadline, and the connection may notice it a moment
// before ctx does: a timeout at or past the deadline is ctx's.
func ctxErr(ctx context.Context, dl time.Time, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() && !dl.IsZero() && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return nil
}

func (c *Client) exchange(req []byte) (string, error) {
	if _, err := c.conn.Write(req); err != nil {
		return "", err
	}
	line, err := c.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(line, "\n"), nil
}

// breakConn marks the connection unusable and closes it, returning err.
func (c *Client) breakConn(err error) error {
	if c.broken == nil {
		c.broken = err
		c.conn.Close()
	}
	return err
}

// Payload is the deterministic payload of record n that tests write, so that
// Expected can compute the service's summary without keeping the records.
// It is 64 bytes: "record <n> " followed by letters that depend on n.
func Payload(n uint64) []byte {
	const size = 64
	p := make([]byte, 0, size)
	p = append(p, "record "...)
	p = strconv.AppendUint(p, n, 10)
	p = append(p, ' ')
	// Letters from a 64-bit LCG (Knuth's MMIX constants) seeded with n.
	x := n
	for len(p) < size {
		x = x*6364136223846793005 + 1442695040888963407
		p = append(p, byte('a'+(x>>33)%26))
	}
	return p
}

// Expected is the summary of a log holding exactly records 1..n with
// Payload(i) as the payload of record i.
func Expected(n uint64) Summary {
	s := Summary{Count: n, Last: n, Checksum: wire.EmptyChecksum}
	for i := uint64(1); i <= n; i++ {
		s.Checksum = s.Checksum.Add(i, Payload(i))
	}
	return s
}
