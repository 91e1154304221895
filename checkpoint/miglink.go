package checkpoint

import (
	"context"
	"net"
	"os"
	"time"
)

// MigrationLink opens the migration connection of one protection inside lockstep instead of
// letting QEMU dial it: both ends get TCP_NODELAY (QEMU's own sockets leave Nagle on, and the
// secondary's small COLO replies then wait for the primary's delayed ACK at every checkpoint),
// and lockstep keeps a copy of the primary's end to read TCP_INFO. Dial and Accept plug into
// ProtectConfig.DialMigration and AcceptMigration.
type MigrationLink struct {
	ln *net.TCPListener
}

// ListenMigration listens on host (the secondary's address) on a free port.
func ListenMigration(host string) (*MigrationLink, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return nil, err
	}
	return &MigrationLink{ln: ln.(*net.TCPListener)}, nil
}

// Close stops listening.
func (m *MigrationLink) Close() error { return m.ln.Close() }

// Dial returns a DialMigration function. keep, when set, receives a copy of the primary's end
// (for Observer.SetMigrationSocket), which it then owns.
func (m *MigrationLink) Dial(keep func(*os.File)) func(ctx context.Context) (*os.File, error) {
	return func(ctx context.Context) (*os.File, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", m.ln.Addr().String())
		if err != nil {
			return nil, err
		}
		tc := c.(*net.TCPConn)
		defer tc.Close()
		f, err := tc.File() // a duplicate descriptor: QEMU gets it
		if err != nil {
			return nil, err
		}
		if keep != nil {
			if dup, err := tc.File(); err == nil {
				keep(dup)
			}
		}
		return f, nil
	}
}

// Accept returns the secondary's end of the connection Dial opened, for AcceptMigration.
func (m *MigrationLink) Accept(ctx context.Context) (*os.File, error) {
	if d, ok := ctx.Deadline(); ok {
		m.ln.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { m.ln.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	c, err := m.ln.AcceptTCP()
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	defer c.Close()
	return c.File()
}
