package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/lockstepvm/lockstep/qmp"
)

// Encrypted replication: every channel between a pair's two QEMUs can run over TLS with QEMU's
// own x509 credentials (tls-creds-x509), each side presenting its host's certificate:
//   - the migration stream (memory and device state at every checkpoint): the migration
//     parameters tls-creds (and tls-hostname on the primary, since lockstep hands QEMU the
//     connection as an fd, which names no host; tls-authz on the secondary);
//   - NBD (the guest's disk writes): tls-creds and tls-authz on the secondary's nbd-server-start,
//     tls-creds on the primary's nbd blockdev;
//   - the mirror and compare channels (the guest's network traffic): tls-creds and tls-authz on
//     the primary's socket chardev servers mirror0 and compare1, tls-creds on the secondary's
//     clients red0 and red1.
// A client checks the server's certificate against the address it connects to (its IP SANs);
// a server accepts only the peer host's certificate (tls-authz: its subject common name).
// The credentials objects of a generation carry its number, so each protection loads the
// certificates afresh (a renewed certificate takes effect at the next protection) and never
// collides with an older generation's.

// TLSMode says whether a pair's replication channels are encrypted.
type TLSMode string

// TLS modes.
const (
	// TLSAuto, the default: encrypted when the two sides run on two hosts, plaintext when both
	// run on one (nothing crosses a network then).
	TLSAuto TLSMode = ""
	TLSOn   TLSMode = "on"
	TLSOff  TLSMode = "off"
)

// Enabled resolves the mode for a pair whose sides run on two hosts (twoHosts) or on one.
func (m TLSMode) Enabled(twoHosts bool) bool {
	switch m {
	case TLSOn:
		return true
	case TLSOff:
		return false
	}
	return twoHosts
}

// Valid reports whether m is one of the modes.
func (m TLSMode) Valid() bool { return m == TLSAuto || m == TLSOn || m == TLSOff || m == "auto" }

// The files of a QEMU x509 credentials folder, by QEMU's names.
const (
	TLSCACert     = "ca-cert.pem"
	TLSServerCert = "server-cert.pem"
	TLSServerKey  = "server-key.pem"
	TLSClientCert = "client-cert.pem"
	TLSClientKey  = "client-key.pem"
)

// WriteTLSDir writes a QEMU credentials folder: the host's certificate and key serve as both
// its server and its client identity, and caPEM is what the peer's certificate must chain to.
// Keys are written 0600; files are replaced atomically, so a QEMU loading the folder never
// reads half of one.
func WriteTLSDir(dir string, certPEM, keyPEM, caPEM []byte) error {
	if len(certPEM) == 0 || len(keyPEM) == 0 || len(caPEM) == 0 {
		return errors.New("replication TLS: a certificate, its key and a CA are needed")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for name, b := range map[string][]byte{TLSCACert: caPEM, TLSServerCert: certPEM, TLSServerKey: keyPEM, TLSClientCert: certPEM, TLSClientKey: keyPEM} {
		tmp := filepath.Join(dir, "."+name+".tmp")
		if err := os.WriteFile(tmp, b, 0o600); err != nil {
			return err
		}
		if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
			os.Remove(tmp)
			return err
		}
	}
	return nil
}

// GenTLS is the TLS wiring of one generation. Each agent fills in what its own QEMU needs: the
// primary's agent PrimaryDir and SecondaryName, the secondary's SecondaryDir and PrimaryName;
// one process driving both QEMUs fills in all four.
type GenTLS struct {
	// PrimaryDir and SecondaryDir are the QEMUs' credentials folders (WriteTLSDir).
	PrimaryDir, SecondaryDir string
	// PrimaryName and SecondaryName are the host names the sides' certificates carry as their
	// subject common name: each side's QEMU accepts connections from its peer's only.
	PrimaryName, SecondaryName string
}

// Object names of a generation's TLS wiring; the secondary's command line has tlsRedCreds.
const tlsRedCreds = "tlsred"

func tlsServerID(g Generation) string { return "tlss" + strconv.Itoa(g.N) }
func tlsClientID(g Generation) string { return "tlsc" + strconv.Itoa(g.N) }
func tlsAuthzID(g Generation) string  { return "tlsz" + strconv.Itoa(g.N) }

// tlsObjectRE matches the TLS objects lockstep adds, of any generation.
var tlsObjectRE = regexp.MustCompile(`^(tls[scz][0-9]+|` + tlsRedCreds + `)$`)

// secondaryTLSArgs are the secondary's command-line objects for its red0/red1 clients.
func secondaryTLSArgs(side Side) []string {
	if side.TLSDir == "" {
		return nil
	}
	return []string{"-object", fmt.Sprintf("tls-creds-x509,id=%s,endpoint=client,dir=%s,verify-peer=on", tlsRedCreds, escapeOpt(side.TLSDir))}
}

// secondaryChardevTLS is the option the secondary's red0/red1 take ("" without TLS).
func secondaryChardevTLS(side Side) string {
	if side.TLSDir == "" {
		return ""
	}
	return ",tls-creds=" + tlsRedCreds
}

// credsAdd is the step that adds an x509 credentials object.
func credsAdd(who string, c *qmp.Client, id, dir, endpoint string) Step {
	return Step{Name: who + ": object-add " + id + " (tls-creds-x509 " + endpoint + ")", Run: func(ctx context.Context) error {
		return c.ObjectAdd(ctx, "tls-creds-x509", id, map[string]any{"dir": dir, "endpoint": endpoint, "verify-peer": true})
	}}
}

// authzAdd is the step that adds the authorization that admits only host peer's certificate.
// QEMU matches the certificate's distinguished name as GnuTLS prints it (RFC 4514, the common
// name first): "CN=peer" alone or followed by further attributes.
func authzAdd(who string, c *qmp.Client, id, peer string) Step {
	return Step{Name: who + ": object-add " + id + " (authz-list " + peer + ")", Run: func(ctx context.Context) error {
		return c.ObjectAdd(ctx, "authz-list", id, map[string]any{"policy": "deny", "rules": []map[string]any{
			{"match": "CN=" + peer, "policy": "allow", "format": "exact"},
			{"match": "CN=" + globEscape(peer) + ",*", "policy": "allow", "format": "glob"},
		}})
	}}
}

// globEscape escapes fnmatch's special characters; host names have none, but a name must
// never widen the match.
func globEscape(s string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '*', '?', '[', ']', '\\':
			out = append(out, '\\')
		}
		out = append(out, s[i])
	}
	return string(out)
}

// dropOldTLS is the step that removes the TLS objects of earlier generations from a QEMU that
// protects again (the survivor of a failover, or a primary that lost its secondary). Their
// channels are gone by then; what cannot be removed stays, and the protection goes on.
func dropOldTLS(who string, c *qmp.Client, g Generation) Step {
	return Step{Name: who + ": drop earlier TLS objects", Run: func(ctx context.Context) error {
		var props []struct {
			Name string `json:"name"`
		}
		if err := c.Execute(ctx, "qom-list", map[string]any{"path": "/objects"}, &props); err != nil {
			return nil // a listing it cannot have leaves the objects, nothing worse
		}
		for _, p := range props {
			if !tlsObjectRE.MatchString(p.Name) || p.Name == tlsServerID(g) || p.Name == tlsClientID(g) || p.Name == tlsAuthzID(g) {
				continue
			}
			if err := c.ObjectDel(ctx, p.Name); err != nil && ctx.Err() != nil {
				return err
			}
		}
		return nil
	}}
}

// primaryTLSSteps come before the primary's chardevs: its server credentials (mirror0 and
// compare1), its client credentials (NBD and migration) and the authorization of the
// secondary's host.
func primaryTLSSteps(p *qmp.Client, g Generation) []Step {
	if g.TLS == nil {
		return nil
	}
	return []Step{
		dropOldTLS("primary", p, g),
		credsAdd("primary", p, tlsServerID(g), g.TLS.PrimaryDir, "server"),
		credsAdd("primary", p, tlsClientID(g), g.TLS.PrimaryDir, "client"),
		authzAdd("primary", p, tlsAuthzID(g), g.TLS.SecondaryName),
	}
}

// primaryChardevTLS adds TLS to the backend of one of the primary's channel servers for the
// secondary (mirror0, compare1).
func primaryChardevTLS(backend map[string]any, g Generation) map[string]any {
	if g.TLS == nil {
		return backend
	}
	data := backend["data"].(map[string]any)
	data["tls-creds"] = tlsServerID(g)
	data["tls-authz"] = tlsAuthzID(g)
	return backend
}

// nbdClientTLS adds TLS to the primary's nbd blockdev options; QEMU checks the secondary's
// certificate against the server address.
func nbdClientTLS(opts map[string]any, g Generation) map[string]any {
	if g.TLS != nil {
		opts["tls-creds"] = tlsClientID(g)
	}
	return opts
}

// migrationTLS sets the primary's migration TLS parameters: its client credentials and the
// host name to check the secondary's certificate against (the fd names none). Without TLS it
// clears tls-creds, which a survivor of an encrypted generation may still have set.
func migrationTLS(params qmp.MigrationParameters, g Generation) qmp.MigrationParameters {
	creds, host := "", ""
	if g.TLS != nil {
		creds, host = tlsClientID(g), g.SecondaryHost
		params.TLSHostname = &host
	}
	params.TLSCreds = &creds
	return params
}

// secondaryTLSSteps come after the secondary's capabilities: its server credentials (NBD and
// the incoming migration), the authorization of the primary's host, and the incoming
// migration's TLS parameters.
func secondaryTLSSteps(s *qmp.Client, g Generation) []Step {
	if g.TLS == nil {
		return nil
	}
	return []Step{
		credsAdd("secondary", s, tlsServerID(g), g.TLS.SecondaryDir, "server"),
		authzAdd("secondary", s, tlsAuthzID(g), g.TLS.PrimaryName),
		{Name: "secondary: migrate-set-parameters tls", Run: func(ctx context.Context) error {
			creds, authz := tlsServerID(g), tlsAuthzID(g)
			return s.MigrateSetParameters(ctx, qmp.MigrationParameters{TLSCreds: &creds, TLSAuthz: &authz})
		}},
	}
}

// nbdServerStart starts the secondary's NBD server, over TLS for an encrypted generation.
func nbdServerStart(ctx context.Context, s *qmp.Client, g Generation) error {
	if g.TLS == nil {
		return s.NBDServerStart(ctx, g.SecondaryHost, strconv.Itoa(g.Ports.NBD))
	}
	return s.Execute(ctx, "nbd-server-start", map[string]any{
		"addr":      map[string]any{"type": "inet", "data": map[string]any{"host": g.SecondaryHost, "port": strconv.Itoa(g.Ports.NBD)}},
		"tls-creds": tlsServerID(g), "tls-authz": tlsAuthzID(g),
	}, nil)
}

// tlsDirProblem says what is wrong with a credentials folder ("" when nothing is, or when
// there is none: plaintext).
func tlsDirProblem(dir string) string {
	if dir == "" {
		return ""
	}
	if !filepath.IsAbs(dir) {
		return fmt.Sprintf("%q: want an absolute path", dir)
	}
	for _, f := range []string{TLSCACert, TLSServerCert, TLSServerKey, TLSClientCert, TLSClientKey} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return err.Error()
		}
	}
	return ""
}

// tlsNonblocking makes the migration socket f non-blocking for an encrypted generation, once
// it was passed to QEMU (getfd) and before QEMU uses it. QEMU runs the TLS handshake of an fd
// migration in its main loop and needs a non-blocking socket for it (it makes the socket
// blocking itself once the stream starts). Passing the descriptor made it blocking (os.File's
// Fd does), and then the primary's handshake held its main loop, QMP included, until the
// secondary answered, which it could not do before migrate returned: seen on QEMU 11.1.3,
// migrate never answered. The flag belongs to the socket, so this process's copy sets it for
// QEMU's too.
func tlsNonblocking(g Generation, f *os.File) error {
	if g.TLS == nil {
		return nil
	}
	sc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := sc.Control(func(fd uintptr) { serr = unix.SetNonblock(int(fd), true) }); err != nil {
		return err
	}
	return serr
}
