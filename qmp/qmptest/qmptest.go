// Package qmptest is a scripted fake QEMU for unit tests of QMP clients.
//
// A Server listens on a unix socket (or TCP on loopback), greets every connection like QEMU,
// negotiates capabilities and dispatches each request to the handler registered for its command.
// As in QEMU, in-band commands of one connection run one at a time in arrival order, while
// out-of-band ("exec-oob") commands run at once, even while an in-band handler blocks. Unknown
// commands get QEMU's CommandNotFound error. Every request is recorded for assertions. Raw mode
// (OnConnect) hands the test the bare connection to send anything at all.
//
// All goroutines of a Server stop in Close, which tests register with t.Cleanup through New.
package qmptest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// DefaultGreeting is the greeting of QEMU 11.1.3 offering OOB.
const DefaultGreeting = `{"QMP": {"version": {"qemu": {"micro": 3, "minor": 1, "major": 11}, "package": "Debian 1:11.1.3+ds-1~bpo13+1"}, "capabilities": ["oob"]}}`

// Request is one command received from the client.
type Request struct {
	Command string
	OOB     bool
	ID      json.RawMessage
	Args    json.RawMessage
	// Files are the descriptors received with the request (SCM_RIGHTS); the handler owns them.
	Files []*os.File
}

// DecodeArgs decodes the request's arguments into v.
func (r *Request) DecodeArgs(v any) error {
	if len(r.Args) == 0 {
		return errors.New("qmptest: request has no arguments")
	}
	return json.Unmarshal(r.Args, v)
}

// Handler answers a request. It runs on the connection's dispatcher (in-band) or its own
// goroutine (OOB) and may block; it should return when conn.Done() is closed.
type Handler func(conn *Conn, req *Request)

// Return is a Handler that replies with v.
func Return(v any) Handler {
	return func(c *Conn, r *Request) { c.Reply(r, v) }
}

// Fail is a Handler that replies with a QMP error.
func Fail(class, desc string) Handler {
	return func(c *Conn, r *Request) { c.ReplyError(r, class, desc) }
}

// Hang is a Handler that never replies; it returns when the connection ends.
func Hang() Handler {
	return func(c *Conn, r *Request) { <-c.Done() }
}

// Server is a fake QEMU QMP endpoint.
type Server struct {
	t        testing.TB
	ln       net.Listener
	network  string
	addr     string
	greeting string

	mu        sync.Mutex
	handlers  map[string]Handler
	onConnect func(*Conn)
	requests  []*Request
	conns     map[*Conn]struct{}
	closed    bool

	wg sync.WaitGroup
}

// New starts a fake QEMU on a unix socket in a temporary folder; the test closes it when it ends.
func New(t testing.TB) *Server {
	t.Helper()
	dir, err := os.MkdirTemp("", "qmpt")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "qmp.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := start(t, ln, "unix", path)
	t.Cleanup(func() { s.Close(); os.RemoveAll(dir) })
	return s
}

// NewTCP starts a fake QEMU on a loopback TCP port; the test closes it when it ends.
func NewTCP(t testing.TB) *Server {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := start(t, ln, "tcp", ln.Addr().String())
	t.Cleanup(func() { s.Close() })
	return s
}

func start(t testing.TB, ln net.Listener, network, addr string) *Server {
	s := &Server{
		t: t, ln: ln, network: network, addr: addr, greeting: DefaultGreeting,
		handlers: map[string]Handler{
			"qmp_capabilities": Return(struct{}{}),
		},
		conns: map[*Conn]struct{}{},
	}
	s.wg.Add(1)
	go s.accept()
	return s
}

// Network returns "unix" or "tcp".
func (s *Server) Network() string { return s.network }

// Addr returns the socket path or host:port to dial.
func (s *Server) Addr() string { return s.addr }

// SetGreeting replaces the greeting line sent to new connections.
func (s *Server) SetGreeting(line string) {
	s.mu.Lock()
	s.greeting = line
	s.mu.Unlock()
}

// Handle registers h for command.
func (s *Server) Handle(command string, h Handler) {
	s.mu.Lock()
	s.handlers[command] = h
	s.mu.Unlock()
}

// OnConnect switches the server to raw mode: f gets each new connection before anything is sent
// and owns it entirely (no greeting, no dispatch). f runs on its own goroutine.
func (s *Server) OnConnect(f func(*Conn)) {
	s.mu.Lock()
	s.onConnect = f
	s.mu.Unlock()
}

// Requests returns the requests received so far, in arrival order.
func (s *Server) Requests() []*Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*Request(nil), s.requests...)
}

// RequestsFor returns the received requests for one command.
func (s *Server) RequestsFor(command string) []*Request {
	var out []*Request
	for _, r := range s.Requests() {
		if r.Command == command {
			out = append(out, r)
		}
	}
	return out
}

// Conns returns the open connections.
func (s *Server) Conns() []*Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*Conn, 0, len(s.conns))
	for c := range s.conns {
		out = append(out, c)
	}
	return out
}

// WaitConn waits up to d for a connection to be open and returns one.
func (s *Server) WaitConn(d time.Duration) (*Conn, error) {
	deadline := time.Now().Add(d)
	for {
		if cs := s.Conns(); len(cs) > 0 {
			return cs[0], nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("qmptest: no connection within %v", d)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// Close stops accepting, closes every connection and waits for all goroutines of the server.
func (s *Server) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	conns := make([]*Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	s.ln.Close()
	for _, c := range conns {
		c.Close()
	}
	s.wg.Wait()
}

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		nc, err := s.ln.Accept()
		if err != nil {
			return
		}
		c := &Conn{s: s, nc: nc, done: make(chan struct{}), inband: make(chan *Request, 1024)}
		c.unix, _ = nc.(*net.UnixConn)
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			nc.Close()
			return
		}
		s.conns[c] = struct{}{}
		raw := s.onConnect
		greeting := s.greeting
		s.mu.Unlock()
		if raw != nil {
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				raw(c)
			}()
			continue
		}
		c.Send(greeting)
		s.wg.Add(2)
		go c.read()
		go c.dispatch()
	}
}

// Conn is one client connection to the fake QEMU.
type Conn struct {
	s      *Server
	nc     net.Conn
	unix   *net.UnixConn
	wmu    sync.Mutex
	done   chan struct{}
	once   sync.Once
	inband chan *Request
}

// Done is closed when the connection is closed.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Close closes the connection.
func (c *Conn) Close() {
	c.once.Do(func() {
		close(c.done)
		c.nc.Close()
		c.s.mu.Lock()
		delete(c.s.conns, c)
		c.s.mu.Unlock()
	})
}

// Net returns the underlying connection, for raw-mode tests.
func (c *Conn) Net() net.Conn { return c.nc }

// Send writes line plus a newline, as is.
func (c *Conn) Send(line string) {
	c.SendBytes([]byte(line + "\n"))
}

// SendBytes writes b as is.
func (c *Conn) SendBytes(b []byte) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, _ = c.nc.Write(b)
}

// Reply sends a successful reply to req.
func (c *Conn) Reply(req *Request, v any) {
	ret, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	c.sendMsg(map[string]json.RawMessage{"return": ret}, req.ID)
}

// ReplyError sends a QMP error reply to req.
func (c *Conn) ReplyError(req *Request, class, desc string) {
	e, _ := json.Marshal(map[string]string{"class": class, "desc": desc})
	c.sendMsg(map[string]json.RawMessage{"error": e}, req.ID)
}

func (c *Conn) sendMsg(m map[string]json.RawMessage, id json.RawMessage) {
	if len(id) > 0 {
		m["id"] = id
	}
	b, _ := json.Marshal(m)
	c.SendBytes(append(b, '\n'))
}

// Event sends an event with data (nil for none) and the given timestamp.
func (c *Conn) Event(name string, data any, ts time.Time) {
	m := map[string]any{
		"event":     name,
		"timestamp": map[string]int64{"seconds": ts.Unix(), "microseconds": int64(ts.Nanosecond() / 1000)},
	}
	if data != nil {
		m["data"] = data
	}
	b, _ := json.Marshal(m)
	c.SendBytes(append(b, '\n'))
}

type wireRequest struct {
	Execute   string          `json:"execute"`
	ExecOOB   string          `json:"exec-oob"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

// read splits the byte stream into requests, collecting descriptors passed with them.
func (c *Conn) read() {
	defer c.s.wg.Done()
	defer close(c.inband)
	var buf []byte
	var fds []*os.File
	chunk := make([]byte, 64<<10)
	oob := make([]byte, syscall.CmsgSpace(16*4))
	for {
		var n, oobn int
		var err error
		if c.unix != nil {
			n, oobn, _, _, err = c.unix.ReadMsgUnix(chunk, oob)
		} else {
			n, err = c.nc.Read(chunk)
		}
		if n < 0 {
			n = 0
		}
		if oobn > 0 {
			fds = append(fds, parseRights(oob[:oobn])...)
		}
		buf = append(buf, chunk[:n]...)
		for {
			i := objectEnd(buf)
			if i < 0 {
				break
			}
			line := append([]byte(nil), buf[:i]...)
			buf = buf[i:]
			req, perr := parseRequest(line)
			if perr != nil {
				// QEMU answers a line it cannot parse with an error without id.
				c.sendMsg(map[string]json.RawMessage{"error": json.RawMessage(`{"class":"GenericError","desc":"JSON parse error"}`)}, nil)
				continue
			}
			req.Files, fds = fds, nil
			c.s.mu.Lock()
			c.s.requests = append(c.s.requests, req)
			c.s.mu.Unlock()
			if req.OOB {
				c.s.wg.Add(1)
				go func() {
					defer c.s.wg.Done()
					c.handle(req)
				}()
				continue
			}
			select {
			case c.inband <- req:
			case <-c.done:
				return
			}
		}
		if err != nil {
			c.Close()
			for _, f := range fds {
				f.Close()
			}
			return
		}
	}
}

// objectEnd returns the length of the first complete request in buf (leading whitespace, then a
// JSON object; QEMU, like this fake, needs no newline after it), or -1 when it is incomplete. A
// line that does not start an object counts up to its newline, so it can be refused.
func objectEnd(buf []byte) int {
	i := 0
	for i < len(buf) && (buf[i] == ' ' || buf[i] == '\n' || buf[i] == '\r' || buf[i] == '\t') {
		i++
	}
	if i == len(buf) {
		return -1
	}
	if buf[i] != '{' {
		if j := bytes.IndexByte(buf[i:], '\n'); j >= 0 {
			return i + j + 1
		}
		return -1
	}
	depth, inString, escaped := 0, false, false
	for ; i < len(buf); i++ {
		c := buf[i]
		switch {
		case escaped:
			escaped = false
		case inString:
			if c == '\\' {
				escaped = true
			} else if c == '"' {
				inString = false
			}
		case c == '"':
			inString = true
		case c == '{' || c == '[':
			depth++
		case c == '}' || c == ']':
			depth--
			if depth == 0 {
				return i + 1
			}
		}
	}
	return -1
}

func parseRequest(line []byte) (*Request, error) {
	var w wireRequest
	if err := json.Unmarshal(line, &w); err != nil {
		return nil, err
	}
	r := &Request{ID: w.ID, Args: w.Arguments}
	switch {
	case w.ExecOOB != "":
		r.Command, r.OOB = w.ExecOOB, true
	case w.Execute != "":
		r.Command = w.Execute
	default:
		return nil, errors.New("no execute")
	}
	return r, nil
}

func parseRights(oob []byte) []*os.File {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var out []*os.File
	for _, m := range msgs {
		fds, err := syscall.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			out = append(out, os.NewFile(uintptr(fd), "passed-fd"))
		}
	}
	return out
}

// dispatch runs in-band requests one at a time, like QEMU's monitor.
func (c *Conn) dispatch() {
	defer c.s.wg.Done()
	for {
		select {
		case req, ok := <-c.inband:
			if !ok {
				return
			}
			c.handle(req)
		case <-c.done:
			return
		}
	}
}

func (c *Conn) handle(req *Request) {
	c.s.mu.Lock()
	h := c.s.handlers[req.Command]
	c.s.mu.Unlock()
	if h == nil {
		c.ReplyError(req, "CommandNotFound", fmt.Sprintf("The command %s has not been found", req.Command))
		return
	}
	h(c, req)
}
