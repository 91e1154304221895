package coord

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// EmbeddedConfig configures StartEmbedded.
type EmbeddedConfig struct {
	// Dir holds the server's data (WAL and database); required. Restarting on the same Dir
	// keeps the pairs.
	Dir string
	// ClientURL is where clients connect (DefaultEmbeddedURL if empty). Port 0 picks a free
	// port; Endpoints reports the one chosen.
	ClientURL string
	// PeerURL is the raft peer URL (DefaultEmbeddedURL if empty). A single member never talks
	// to a peer, but etcd insists on listening on one.
	PeerURL string
	// Name is the member name ("lockstep" if empty).
	Name string
	// StartTimeout bounds the wait for the server to be ready (DefaultEmbeddedStartTimeout if
	// zero).
	StartTimeout time.Duration
	// Log receives the server's error-level messages (discarded if nil).
	Log *slog.Logger
	// TLS, required for an https ClientURL, is the server's certificate and the CA that every
	// client certificate must chain to: clients without one are refused. The peer URL is then
	// https too, with the same certificate (EmbeddedTLS).
	TLS *EmbeddedTLS
}

// DefaultEmbeddedURL is the default client and peer URL of the embedded server: loopback only,
// since single-host mode has no other host to serve.
const DefaultEmbeddedURL = "http://127.0.0.1:0"

// DefaultEmbeddedStartTimeout is generous because the first start creates and fsyncs the WAL,
// which is slow on a loaded CI disk.
const DefaultEmbeddedStartTimeout = 30 * time.Second

// Embedded is a single-member etcd server running inside this process.
type Embedded struct {
	etcd      *embed.Etcd
	dir       string
	endpoints []string
	closeOnce sync.Once
	closing   *atomic.Bool
}

// StartEmbedded starts an etcd server in this process and waits until it serves.
//
// The server ticks every 50 ms with a 500 ms election timeout. etcd's minimum lease TTL is
// ceil(1.5 × election timeout), so this makes a 1 s lease TTL possible; with etcd's defaults the
// minimum would be 2 s and a 1 s Acquire would silently get 2 s.
func StartEmbedded(cfg EmbeddedConfig) (*Embedded, error) {
	if cfg.Dir == "" {
		return nil, errors.New("coord: embedded etcd: no data dir")
	}
	if cfg.ClientURL == "" {
		cfg.ClientURL = DefaultEmbeddedURL
	}
	if cfg.PeerURL == "" {
		cfg.PeerURL = DefaultEmbeddedURL
		if cfg.TLS != nil {
			cfg.PeerURL = defaultEmbeddedTLSURL
		}
	}
	if err := cfg.checkTLS(); err != nil {
		return nil, err
	}
	if cfg.Name == "" {
		cfg.Name = "lockstep"
	}
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = DefaultEmbeddedStartTimeout
	}
	// A port we picked can be taken by someone else before etcd binds it; try again with new
	// ports in that case only.
	var lastErr error
	for range 3 {
		e, picked, err := startEmbedded(cfg)
		if err == nil {
			return e, nil
		}
		lastErr = err
		if !errors.Is(err, syscall.EADDRINUSE) || !slices.ContainsFunc(picked, func(addr string) bool {
			return strings.Contains(err.Error(), addr)
		}) {
			break
		}
	}
	return nil, lastErr
}

// startEmbedded makes one attempt; picked lists the host:port addresses it chose itself.
func startEmbedded(cfg EmbeddedConfig) (_ *Embedded, picked []string, _ error) {
	cu, pc, err := concreteURL(cfg.ClientURL)
	if err != nil {
		return nil, nil, fmt.Errorf("coord: embedded etcd client URL: %w", err)
	}
	pu, pp, err := concreteURL(cfg.PeerURL)
	if err != nil {
		return nil, nil, fmt.Errorf("coord: embedded etcd peer URL: %w", err)
	}
	if pc {
		picked = append(picked, cu.Host)
	}
	if pp {
		picked = append(picked, pu.Host)
	}

	ec := embed.NewConfig()
	ec.Name = cfg.Name
	ec.Dir = cfg.Dir
	ec.ListenClientUrls = []url.URL{*cu}
	ec.AdvertiseClientUrls = []url.URL{*cu}
	ec.ListenPeerUrls = []url.URL{*pu}
	ec.AdvertisePeerUrls = []url.URL{*pu}
	cfg.TLS.apply(ec, cu, pu)
	ec.InitialCluster = cfg.Name + "=" + pu.String()
	ec.TickMs = 50
	ec.ElectionMs = 500
	ec.LogLevel = "error"
	closing := new(atomic.Bool)
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(newZapLoggerClosing(cfg.Log, closing))
	ec.ListenMetricsUrls = nil
	ec.EnableGRPCGateway = false
	// Hourly compaction keeps the history of a long-running agent bounded; the watchers in this
	// package re-list after a compaction, so nobody depends on old revisions.
	ec.AutoCompactionMode = embed.CompactorModePeriodic
	ec.AutoCompactionRetention = "1h"

	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, picked, fmt.Errorf("coord: start embedded etcd in %s: %w", cfg.Dir, err)
	}
	t := time.NewTimer(cfg.StartTimeout)
	defer t.Stop()
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, picked, fmt.Errorf("coord: embedded etcd in %s failed while starting: %w", cfg.Dir, err)
	case <-e.Server.StopNotify():
		e.Close()
		return nil, picked, fmt.Errorf("coord: embedded etcd in %s stopped while starting", cfg.Dir)
	case <-t.C:
		e.Close()
		return nil, picked, fmt.Errorf("coord: embedded etcd in %s not ready after %v", cfg.Dir, cfg.StartTimeout)
	}
	return &Embedded{etcd: e, dir: cfg.Dir, endpoints: []string{cu.String()}, closing: closing}, picked, nil
}

// concreteURL replaces port 0 with a free port: etcd advertises the URL it is given, so it needs
// the real port up front rather than the one the kernel would pick at bind time.
func concreteURL(raw string) (*url.URL, bool, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, false, err
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, false, fmt.Errorf("%q: scheme must be http or https", raw)
	}
	host, port := u.Hostname(), u.Port()
	if host == "" {
		return nil, false, fmt.Errorf("%q: no host", raw)
	}
	if port != "" && port != "0" {
		return u, false, nil
	}
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return nil, false, fmt.Errorf("pick a free port on %s: %w", host, err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		return nil, false, err
	}
	c := *u
	c.Host = addr
	return &c, true, nil
}

// Endpoints returns the client URLs to give to NewEtcd.
func (e *Embedded) Endpoints() []string { return append([]string(nil), e.endpoints...) }

// Dir returns the data directory.
func (e *Embedded) Dir() string { return e.dir }

// Close stops the server and waits until it has stopped; clients still connected then see the
// store as unavailable until a server is started again on the same data dir (and client URL).
func (e *Embedded) Close() error {
	e.closeOnce.Do(func() {
		e.closing.Store(true)
		e.etcd.Close()
		<-e.etcd.Server.StopNotify()
	})
	return nil
}
