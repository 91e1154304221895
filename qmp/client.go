// Package qmp is a client of the QEMU Machine Protocol that never blocks on its peer or on its
// own callers.
//
// One Client owns one QMP connection. Any number of goroutines may call Execute at once. QEMU
// runs the in-band commands of a monitor one at a time and answers them in the order it read
// them, so in-band commands go without an id (QEMU reads its monitor one byte per read: every
// byte of a request costs it a poll and a read) and their replies are matched by that order;
// out-of-band commands, whose replies may overtake in-band ones, carry an id and are matched by
// it. A single reader goroutine, owned by the Client and stopped by
// Close or by the loss of the connection, decodes every message; it never waits for a caller or a
// subscriber:
//   - replies go to a one-slot buffered channel of the waiting call; a call whose context ended
//     has already removed itself, and its late reply is discarded (counted in Stats);
//   - events are appended to each matching Subscription's own queue (see Subscription for the
//     policy), so a slow or abandoned subscriber delays nobody.
//
// Messages have no length limit and each decoded message owns its bytes. When the connection is
// lost every pending call fails with an error wrapping ErrClosed, and Done is closed.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Client is one QMP connection. It is safe for concurrent use.
type Client struct {
	conn     net.Conn
	unix     *net.UnixConn
	log      *slog.Logger
	greeting Greeting
	oob      bool

	// inflight bounds the in-band commands outstanding at once. With OOB enabled QEMU stops
	// reading the socket while its in-band queue (8 requests) is full, which would also hold up
	// an out-of-band yank; keeping at most 7 in flight leaves room for it.
	inflight chan struct{}

	wmu sync.Mutex // serialises writes so that lines never interleave

	mu      sync.Mutex
	pending map[string]chan *Message // out-of-band calls, by id
	// inband are the in-band calls in the order their commands were written; the next reply
	// without an id is the first one's.
	inband   []*inbandCall
	subs     map[*Subscription]struct{}
	closeErr error // why the connection ended; set once, before done is closed
	features *Features

	nextID atomic.Uint64
	done   chan struct{}
	rdone  chan struct{} // closed when the reader goroutine has returned
	once   sync.Once

	unknownReplies  atomic.Uint64
	unmatchedEvents atomic.Uint64
	refused         atomic.Uint64
	timeouts        atomic.Uint64
}

// inbandCall is an in-band call waiting for its reply.
type inbandCall struct {
	ch chan *Message
	// abandoned is set when the caller gave up (its context ended): its reply is still
	// consumed in turn, and counted as late.
	abandoned atomic.Bool
}

// Option configures a Client.
type Option func(*options)

type options struct {
	log         *slog.Logger
	noOOB       bool
	maxInflight int
}

// WithLogger sets the logger for protocol anomalies (late replies, dropped events).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithoutOOB does not negotiate out-of-band execution even when QEMU offers it.
func WithoutOOB() Option { return func(o *options) { o.noOOB = true } }

// WithMaxInflight bounds the in-band commands outstanding at once (default 7 when OOB is
// negotiated, 64 otherwise).
func WithMaxInflight(n int) Option { return func(o *options) { o.maxInflight = n } }

// Dial connects to a QMP server ("unix" or "tcp") and completes the handshake within ctx.
func Dial(ctx context.Context, network, addr string, opts ...Option) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("qmp: dial %s %s: %w", network, addr, err)
	}
	c, err := New(ctx, conn, opts...)
	if err != nil {
		return nil, fmt.Errorf("qmp: %s %s: %w", network, addr, err)
	}
	return c, nil
}

// New runs the QMP handshake on an established connection and returns the Client owning it. On
// failure conn is closed.
func New(ctx context.Context, conn net.Conn, opts ...Option) (*Client, error) {
	o := options{log: slog.New(slog.DiscardHandler)}
	for _, f := range opts {
		f(&o)
	}
	c := &Client{
		conn:    conn,
		log:     o.log,
		pending: make(map[string]chan *Message),
		subs:    make(map[*Subscription]struct{}),
		done:    make(chan struct{}),
		rdone:   make(chan struct{}),
	}
	c.unix, _ = conn.(*net.UnixConn)
	r := bufio.NewReaderSize(conn, 64<<10)

	g, err := readGreeting(ctx, conn, r)
	if err != nil {
		conn.Close()
		return nil, err
	}
	c.greeting = *g
	c.oob = g.HasCapability("oob") && !o.noOOB
	n := o.maxInflight
	if n <= 0 {
		n = 64
		if c.oob {
			n = 7
		}
	}
	c.inflight = make(chan struct{}, n)

	go c.reader(r)

	args := map[string]any{}
	if c.oob {
		args["enable"] = []string{"oob"}
	}
	if err := c.Execute(ctx, "qmp_capabilities", args, nil); err != nil {
		c.Close()
		return nil, fmt.Errorf("qmp: capabilities negotiation: %w", err)
	}
	return c, nil
}

func readGreeting(ctx context.Context, conn net.Conn, r *bufio.Reader) (*Greeting, error) {
	stop := deadlineFromContext(ctx, conn.SetReadDeadline)
	line, err := r.ReadBytes('\n')
	stop()
	if err != nil {
		return nil, fmt.Errorf("qmp: waiting for the greeting: %w", ctxError(ctx, err))
	}
	m, err := Decode(line)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotQMP, err)
	}
	if m.Kind != KindGreeting {
		return nil, fmt.Errorf("%w: first message is a %s, not a greeting: %s", ErrNotQMP, m.Kind, excerpt(line))
	}
	return m.Greeting, nil
}

// deadlineFromContext applies ctx's deadline through set and makes cancellation of ctx expire it
// at once. The returned function undoes both and returns only when no further call to set can
// happen.
func deadlineFromContext(ctx context.Context, set func(time.Time) error) (stop func()) {
	if d, ok := ctx.Deadline(); ok {
		set(d)
	}
	fired := make(chan struct{})
	stopAfter := context.AfterFunc(ctx, func() {
		set(time.Unix(1, 0))
		close(fired)
	})
	return func() {
		if !stopAfter() {
			<-fired
		}
		set(time.Time{})
	}
}

// ctxError turns an I/O deadline that ctx set into ctx's own error. The deadline can fire a
// moment before ctx records its expiry, so a timeout under a context deadline counts as it.
func ctxError(ctx context.Context, err error) error {
	if e := ctx.Err(); e != nil {
		return e
	}
	if _, ok := ctx.Deadline(); ok && errors.Is(err, os.ErrDeadlineExceeded) {
		return context.DeadlineExceeded
	}
	return err
}

// Greeting returns what QEMU said when the connection opened.
func (c *Client) Greeting() Greeting { return c.greeting }

// OOB reports whether out-of-band execution was negotiated.
func (c *Client) OOB() bool { return c.oob }

// Done is closed when the connection has ended, by Close or by its loss.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns why the connection ended, or nil while it is open. It wraps ErrClosed.
func (c *Client) Err() error {
	select {
	case <-c.done:
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.closeErr
	default:
		return nil
	}
}

// Close ends the connection: pending calls fail with ErrClosed, subscriptions end. It never
// waits on the peer and is safe to call more than once.
func (c *Client) Close() error {
	c.shutdown(ErrClosed)
	<-c.rdone
	return nil
}

// shutdown records why the connection ended, closes it and fails every pending call.
func (c *Client) shutdown(cause error) {
	c.once.Do(func() {
		if !errors.Is(cause, ErrClosed) {
			cause = fmt.Errorf("%w: %w", ErrClosed, cause)
		}
		c.mu.Lock()
		c.closeErr = cause
		pending := c.pending
		c.pending = nil
		inband := c.inband
		c.inband = nil
		subs := c.subs
		c.subs = nil
		c.mu.Unlock()
		close(c.done)
		c.conn.Close()
		for _, ch := range pending {
			close(ch) // a closed channel tells the waiting call to read closeErr
		}
		for _, call := range inband {
			close(call.ch)
		}
		for s := range subs {
			s.end(cause)
		}
	})
}

// Stats are counters of protocol anomalies on a connection.
type Stats struct {
	// UnknownReplies counts replies that matched no waiting call: late replies of calls whose
	// context ended, replies with an id of no out-of-band call, replies without an id when no
	// in-band call waits.
	UnknownReplies uint64
	// UnmatchedEvents counts events that no subscription wanted.
	UnmatchedEvents uint64
	// Refused counts commands QEMU answered with an error (an *Error).
	Refused uint64
	// Timeouts counts commands whose context's deadline passed before QEMU answered.
	Timeouts uint64
}

// Stats returns the connection's anomaly counters.
func (c *Client) Stats() Stats {
	return Stats{UnknownReplies: c.unknownReplies.Load(), UnmatchedEvents: c.unmatchedEvents.Load(),
		Refused: c.refused.Load(), Timeouts: c.timeouts.Load()}
}

func (c *Client) reader(r *bufio.Reader) {
	defer close(c.rdone)
	for {
		// ReadBytes has no length limit and returns a fresh slice: each message owns its bytes.
		line, err := r.ReadBytes('\n')
		if err != nil {
			if errors.Is(err, io.EOF) && len(line) == 0 {
				err = io.EOF
			}
			c.shutdown(fmt.Errorf("reading from QEMU: %w", err))
			return
		}
		m, err := Decode(line)
		if err != nil {
			// The stream can no longer be trusted to pair replies with calls.
			c.log.Error("qmp: malformed message from QEMU; closing", "err", err)
			c.shutdown(err)
			return
		}
		switch m.Kind {
		case KindReturn, KindError:
			c.deliverReply(m)
		case KindEvent:
			c.deliverEvent(m.Event)
		case KindGreeting:
			c.log.Warn("qmp: unexpected second greeting ignored")
		}
	}
}

func (c *Client) deliverReply(m *Message) {
	if len(m.ID) == 0 || string(m.ID) == "null" {
		c.mu.Lock()
		var call *inbandCall
		if len(c.inband) > 0 {
			call = c.inband[0]
			c.inband[0] = nil
			c.inband = c.inband[1:]
		}
		c.mu.Unlock()
		switch {
		case call == nil:
			c.unknownReplies.Add(1)
			c.log.Warn("qmp: reply without id while no in-band call waits", "err", m.Err)
		case call.abandoned.Load():
			c.unknownReplies.Add(1)
			c.log.Debug("qmp: late reply of an abandoned call")
		default:
			call.ch <- m // buffered with room for exactly this reply
		}
		return
	}
	key := string(m.ID)
	c.mu.Lock()
	ch, ok := c.pending[key]
	if ok {
		delete(c.pending, key)
	}
	c.mu.Unlock()
	if !ok {
		c.unknownReplies.Add(1)
		if m.Err != nil {
			c.log.Warn("qmp: reply matches no pending call", "id", key, "err", m.Err)
		} else {
			c.log.Debug("qmp: reply matches no pending call", "id", key)
		}
		return
	}
	ch <- m // buffered with room for exactly this reply
}

func (c *Client) deliverEvent(ev *Event) {
	c.mu.Lock()
	matched := false
	for s := range c.subs {
		if s.wants(ev.Name) {
			matched = true
			s.push(ev)
		}
	}
	c.mu.Unlock()
	if !matched {
		c.unmatchedEvents.Add(1)
	}
}

// Execute runs an in-band command. args is marshalled as the command's "arguments" (nil for
// none); on success the "return" value is decoded into result unless result is nil. A failure
// reported by QEMU is returned as a *CommandError wrapping *Error. When ctx ends first Execute
// returns at once with ctx's error; QEMU's late reply is then discarded.
func (c *Client) Execute(ctx context.Context, command string, args, result any) error {
	return c.execute(ctx, "execute", command, args, result, nil)
}

// ExecuteOOB runs a command out of band ("exec-oob"): QEMU executes it even while in-band
// commands are stuck. Only OOB-capable commands (e.g. yank) are accepted by QEMU.
func (c *Client) ExecuteOOB(ctx context.Context, command string, args, result any) error {
	if !c.oob {
		return &CommandError{Command: command, Err: ErrNoOOB}
	}
	return c.execute(ctx, "exec-oob", command, args, result, nil)
}

// ExecuteWithFiles runs an in-band command and passes files to QEMU with it (SCM_RIGHTS), as
// getfd and add-fd need. It needs a unix socket connection.
func (c *Client) ExecuteWithFiles(ctx context.Context, command string, args, result any, files ...*os.File) error {
	if c.unix == nil {
		return &CommandError{Command: command, Err: ErrNoFDPassing}
	}
	return c.execute(ctx, "execute", command, args, result, files)
}

// encodeRequest builds a command line by hand, as short as QMP allows: QEMU reads its monitor
// input one byte per read, so each byte costs time on every call. The id, for id > 0, is a bare
// number, and no newline follows (QEMU's JSON parser ends a request at its closing brace).
func encodeRequest(verb, command string, args any, id uint64) ([]byte, error) {
	line := make([]byte, 0, 48+len(command))
	line = append(line, `{"`...)
	line = append(line, verb...)
	line = append(line, `":`...)
	if plainName(command) {
		line = append(line, '"')
		line = append(line, command...)
		line = append(line, '"')
	} else {
		q, err := json.Marshal(command)
		if err != nil {
			return nil, err
		}
		line = append(line, q...)
	}
	if args != nil {
		a, err := json.Marshal(args)
		if err != nil {
			return nil, fmt.Errorf("encoding arguments: %w", err)
		}
		if string(a) != "null" {
			line = append(line, `,"arguments":`...)
			line = append(line, a...)
		}
	}
	if id > 0 {
		line = append(line, `,"id":`...)
		line = strconv.AppendUint(line, id, 10)
	}
	line = append(line, '}')
	return line, nil
}

func plainName(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return len(s) > 0
}

func (c *Client) execute(ctx context.Context, verb, command string, args, result any, files []*os.File) (err error) {
	defer func() {
		if err != nil {
			var qe *Error
			switch {
			case errors.As(err, &qe):
				c.refused.Add(1)
			case errors.Is(err, context.DeadlineExceeded):
				c.timeouts.Add(1)
			}
			var ce *CommandError
			if !errors.As(err, &ce) || ce.Command != command {
				err = &CommandError{Command: command, Err: err}
			}
		}
	}()
	if err := c.Err(); err != nil {
		return err
	}
	if verb == "execute" {
		select {
		case c.inflight <- struct{}{}:
			defer func() { <-c.inflight }()
		case <-ctx.Done():
			return ctx.Err()
		case <-c.done:
			return c.Err()
		}
	}

	var ch chan *Message
	var forget func()
	if verb == "execute" {
		line, err := encodeRequest(verb, command, args, 0)
		if err != nil {
			return err
		}
		call := &inbandCall{ch: make(chan *Message, 1)}
		ch = call.ch
		forget = func() { call.abandoned.Store(true) }
		if err := c.write(ctx, line, files, call); err != nil {
			return err
		}
	} else {
		id := c.nextID.Add(1)
		line, err := encodeRequest(verb, command, args, id)
		if err != nil {
			return err
		}
		key := strconv.FormatUint(id, 10)
		ch = make(chan *Message, 1)
		c.mu.Lock()
		if c.pending == nil {
			c.mu.Unlock()
			return c.Err()
		}
		c.pending[key] = ch
		c.mu.Unlock()
		forget = func() {
			c.mu.Lock()
			if c.pending != nil {
				delete(c.pending, key)
			}
			c.mu.Unlock()
		}
		if err := c.write(ctx, line, files, nil); err != nil {
			forget()
			return err
		}
	}

	select {
	case m, ok := <-ch:
		if !ok {
			return c.Err()
		}
		if m.Err != nil {
			return m.Err
		}
		if result != nil {
			if err := json.Unmarshal(m.Return, result); err != nil {
				return fmt.Errorf("%w: decoding the reply: %v", ErrMalformed, err)
			}
		}
		return nil
	case <-ctx.Done():
		forget()
		return ctx.Err()
	}
}

// write sends one whole line; for an in-band command (call not nil) the call joins the queue of
// in-band calls first, under the write lock, so that the queue's order is the order of the
// commands on the wire. A write that fails after sending part of the line leaves the stream
// unframed, so the connection is closed; one that sent nothing takes its call off the queue.
func (c *Client) write(ctx context.Context, line []byte, files []*os.File, call *inbandCall) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.Err(); err != nil {
		return err
	}
	if call != nil {
		c.mu.Lock()
		if c.closeErr != nil {
			c.mu.Unlock()
			return c.Err()
		}
		c.inband = append(c.inband, call)
		c.mu.Unlock()
	}
	stop := deadlineFromContext(ctx, c.conn.SetWriteDeadline)
	defer stop()
	var n int
	var err error
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		n, _, err = c.unix.WriteMsgUnix(line, syscall.UnixRights(fds...), nil)
		if err == nil && n < len(line) {
			var m int
			m, err = c.conn.Write(line[n:])
			n += m
		}
	} else {
		n, err = c.conn.Write(line)
	}
	if err == nil {
		return nil
	}
	if n == 0 && call != nil {
		// Nothing of it reached QEMU, which will never answer it: the call leaves the queue
		// (it is the last one, as this write holds the write lock).
		c.mu.Lock()
		if k := len(c.inband); k > 0 && c.inband[k-1] == call {
			c.inband[k-1] = nil
			c.inband = c.inband[:k-1]
		}
		c.mu.Unlock()
	}
	if n > 0 {
		c.shutdown(fmt.Errorf("writing to QEMU (%d of %d bytes sent): %w", n, len(line), err))
		return c.Err()
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return ctxError(ctx, err)
	}
	c.shutdown(fmt.Errorf("writing to QEMU: %w", err))
	return c.Err()
}
