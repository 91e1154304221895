package main

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/lockstepvm/lockstep/internal/pki"
)

func (a *app) newCertsCommand() *cobra.Command {
	var dir string
	var hosts, clients []string
	var days int
	cmd := &cobra.Command{
		Use:   "certs --dir DIR --host NAME=IP[,IP...] ... [--client NAME ...]",
		Short: "Make a test CA and the certificates of lockstep's hosts and operators",
		Long: `Write a CA and certificates into DIR, made with the Go standard library (ECDSA P-256):

  DIR/ca.pem, DIR/ca.key      the CA; kept and reused when DIR already has both
  DIR/NAME.pem, DIR/NAME.key  one pair per --host and per --client

A host certificate (--host NAME=IP,...) is that lockstepd's identity: on the peer link
(--peer-cert), as the store's client and server (--etcd-cert), and on its pairs' encrypted
replication channels. It names the host as a URI SAN lockstep://host/NAME, a DNS SAN and the
subject common name, and lists the host's addresses (the ones its pairs' placements and its
store URL use) as IP SANs; it serves both TLS servers and clients. The host of the store gets
one as well, with the address it serves etcd on. A client certificate (--client NAME) is an
operator's, for lockstepctl --tls-cert: it can never speak for a host.

This is a CA for tests, demos and small sites; keep ca.key away from the hosts. It works
offline: no agent is asked.`,
		Example: `  # Two hosts and the store's host, and an operator:
  lockstepctl certs --dir /etc/lockstep/pki --host hosta=10.0.0.1 --host hostb=10.0.0.2 \
    --host etcd=10.0.0.9 --client alice
  # Then on host a:
  lockstepd --host hosta --peer-listen 10.0.0.1:7444 --peer-cert hosta.pem --peer-key hosta.key \
    --peer-ca ca.pem --etcd-endpoints https://10.0.0.9:2379 --etcd-cert hosta.pem \
    --etcd-key hosta.key --etcd-ca ca.pem`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if dir == "" {
				return usagef("certs needs --dir DIR")
			}
			if len(hosts) == 0 && len(clients) == 0 {
				return usagef("certs needs at least one --host NAME=IP or --client NAME")
			}
			if days < 1 {
				return usagef("--days %d: want at least 1", days)
			}
			type hostSpec struct {
				name string
				ips  []net.IP
			}
			var hs []hostSpec
			seen := map[string]string{}
			for _, h := range hosts {
				name, addrs, _ := strings.Cut(h, "=")
				if !pki.ValidName(name) {
					return usagef("--host %q: the name wants 1-63 letters, digits, '.', '_' or '-'", h)
				}
				spec := hostSpec{name: name}
				for _, s := range strings.Split(addrs, ",") {
					if s = strings.TrimSpace(s); s == "" {
						continue
					}
					ip := net.ParseIP(s)
					if ip == nil {
						return usagef("--host %q: %q is not an IP address", h, s)
					}
					spec.ips = append(spec.ips, ip)
				}
				if len(spec.ips) == 0 {
					return usagef("--host %q: give the host's addresses, NAME=IP[,IP...] (its QEMUs' peers check them)", h)
				}
				hs = append(hs, spec)
			}
			for _, n := range append(append([]string{}, hosts...), clients...) {
				n, _, _ = strings.Cut(n, "=")
				if n == "ca" {
					return usagef("%q cannot be a host or client name: it is the CA's file", n)
				}
				if seen[n] != "" {
					return usagef("%q is given twice", n)
				}
				seen[n] = n
			}
			for _, c := range clients {
				if !pki.ValidName(c) {
					return usagef("--client %q: the name wants 1-63 letters, digits, '.', '_' or '-'", c)
				}
			}
			validity := time.Duration(days) * 24 * time.Hour
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return err
			}
			ca, fresh, err := loadOrMakeCA(dir, validity)
			if err != nil {
				return err
			}
			if fresh {
				fmt.Fprintf(a.out, "%s  new CA (keep %s away from the hosts)\n", filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca.key"))
			} else {
				fmt.Fprintf(a.out, "%s  the CA already there\n", filepath.Join(dir, "ca.pem"))
			}
			write := func(name, what string, l pki.Leaf) error {
				cert, key := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
				if err := writeFile(key, l.KeyPEM); err != nil {
					return err
				}
				if err := writeFile(cert, l.CertPEM); err != nil {
					return err
				}
				fmt.Fprintf(a.out, "%s  %s\n", cert, what)
				return nil
			}
			for _, h := range hs {
				l, err := ca.IssueHost(h.name, h.ips, validity)
				if err != nil {
					return err
				}
				if err := write(h.name, fmt.Sprintf("host %s on %v", h.name, h.ips), l); err != nil {
					return err
				}
			}
			for _, c := range clients {
				l, err := ca.IssueClient(c, validity)
				if err != nil {
					return err
				}
				if err := write(c, "operator "+c+" (lockstepctl --tls-cert)", l); err != nil {
					return err
				}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "`DIR` to write the CA and the certificates into")
	f.StringArrayVar(&hosts, "host", nil, "a host certificate, `NAME=IP[,IP...]` (repeat for each host)")
	f.StringArrayVar(&clients, "client", nil, "an operator's client certificate, `NAME` (repeatable)")
	f.IntVar(&days, "days", 365, "validity in `DAYS` (a reused CA's end bounds it)")
	_ = cmd.MarkFlagDirname("dir")
	_ = cmd.RegisterFlagCompletionFunc("host", cobra.NoFileCompletions)
	_ = cmd.RegisterFlagCompletionFunc("client", cobra.NoFileCompletions)
	return cmd
}

// loadOrMakeCA reuses DIR's CA when it has both files, and makes one when it has neither.
func loadOrMakeCA(dir string, validity time.Duration) (*pki.CA, bool, error) {
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca.key")
	certPEM, cerr := os.ReadFile(certFile)
	keyPEM, kerr := os.ReadFile(keyFile)
	switch {
	case cerr == nil && kerr == nil:
		ca, err := pki.LoadCA(certPEM, keyPEM)
		if err != nil {
			return nil, false, fmt.Errorf("%s, %s: %w", certFile, keyFile, err)
		}
		return ca, false, nil
	case errors.Is(cerr, fs.ErrNotExist) && errors.Is(kerr, fs.ErrNotExist):
	case cerr == nil || kerr == nil:
		return nil, false, usagef("%s has one of ca.pem and ca.key but not the other: remove it or restore the missing one", dir)
	default:
		return nil, false, errors.Join(cerr, kerr)
	}
	// The CA outlives the certificates it issues now, so that later ones can be added to it.
	ca, key, err := pki.NewCA("lockstep CA", max(validity, 10*365*24*time.Hour))
	if err != nil {
		return nil, false, err
	}
	if err := writeFile(keyFile, key); err != nil {
		return nil, false, err
	}
	if err := writeFile(certFile, ca.CertPEM); err != nil {
		return nil, false, err
	}
	return ca, true, nil
}

// writeFile writes b to path, 0600, replacing it atomically.
func writeFile(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}
