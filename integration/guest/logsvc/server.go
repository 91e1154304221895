package logsvc

import (
	"bufio"
	"context"
	"errors"
	"net"
	"strconv"
	"strings"
	"sync"

	"github.com/lockstepvm/lockstep/integration/guest/wire"
)

// Server serves a Log over TCP with the protocol of package wire.
type Server struct {
	// Log is the log the server appends to and summarises.
	Log *Log
	// Logf, if set, is told about failures of the disk, which a test would
	// otherwise only see as E replies.
	Logf func(format string, args ...any)
}

// Serve accepts connections on ln and serves each in its own goroutine until
// ctx is done or ln fails. It then closes ln and every open connection, waits
// for their goroutines to finish, and returns nil if ctx ended it, or the
// accept error otherwise.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  = make(map[net.Conn]struct{})
		closed bool
	)
	closeAll := func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		closed = true
		for c := range conns {
			c.Close()
		}
	}
	stop := context.AfterFunc(ctx, closeAll)
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			closeAll()
			wg.Wait()
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		mu.Lock()
		if closed {
			mu.Unlock()
			c.Close()
			continue
		}
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serveConn(c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
			c.Close()
		}()
	}
}

// serveConn answers the requests of one connection until it fails or closes.
func (s *Server) serveConn(c net.Conn) {
	r := bufio.NewReaderSize(c, wire.MaxLine)
	w := bufio.NewWriter(c)
	for {
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = r.ReadSlice('\n')
			}
			if err != nil {
				return
			}
			w.WriteString("E request line longer than " + strconv.Itoa(wire.MaxLine) + " bytes\n")
		} else if err != nil {
			// EOF or a closed connection; a partial last line is dropped.
			return
		} else {
			s.exec(w, line[:len(line)-1])
		}
		// Flush once the pipelined requests already received are answered,
		// so a pipelining client gets its replies in few segments.
		if r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return
			}
		}
	}
}

// exec answers one request line (without its LF).
func (s *Server) exec(w *bufio.Writer, line []byte) {
	switch {
	case len(line) > 0 && line[0] == 'W':
		n, payload, err := wire.ParseWrite(line)
		if err != nil {
			writeErr(w, err)
			return
		}
		if err := s.Log.Append(n, payload); err != nil {
			var seq *SequenceError
			if s.Logf != nil && !errors.As(err, &seq) {
				s.Logf("append record %d: %v", n, err)
			}
			writeErr(w, err)
			return
		}
		w.WriteString("A " + strconv.FormatUint(n, 10) + "\n")
	case string(line) == "Q":
		w.WriteString(s.Log.Summary().Line())
	case string(line) == "D":
		sum, err := s.Log.DiskSummary()
		if err != nil {
			if s.Logf != nil && !errors.Is(err, ErrNoDisk) {
				s.Logf("disk summary: %v", err)
			}
			writeErr(w, err)
			return
		}
		w.WriteString(sum.Line())
	case string(line) == "P":
		w.WriteString("P\n")
	default:
		w.WriteString("E unknown request\n")
	}
}

func writeErr(w *bufio.Writer, err error) {
	w.WriteString("E " + strings.ReplaceAll(err.Error(), "\n", " ") + "\n")
}
