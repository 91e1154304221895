// Command lockstepd is lockstep's agent: it runs protected pairs of QEMU VMs, watches them, fails
// them over and re-protects them by itself, and serves the PairService gRPC API to operators
// (lockstepctl). One agent runs on each host; it runs the sides of every pair placed on its
// host: both sides of a pair whose placements name this host, one side of a pair that spans two
// hosts (then with its peer, the other host's agent, over --peer-listen).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
	"gopkg.in/yaml.v3"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/controller"
	"github.com/lockstepvm/lockstep/coord"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// config holds every setting; the YAML file uses the flag names as keys.
type config struct {
	StateDir      string        `yaml:"state-dir"`
	OverlayDir    string        `yaml:"overlay-dir"`
	Listen        string        `yaml:"listen"`
	Insecure      bool          `yaml:"insecure"`
	TLSCert       string        `yaml:"tls-cert"`
	TLSKey        string        `yaml:"tls-key"`
	TLSCA         string        `yaml:"tls-ca"`
	MetricsListen string        `yaml:"metrics-listen"`
	Pprof         bool          `yaml:"pprof"`
	LogFormat     string        `yaml:"log-format"`
	LogLevel      string        `yaml:"log-level"`
	CheckInterval time.Duration `yaml:"check-interval"`
	CheckTimeout  time.Duration `yaml:"check-timeout"`
	// Two hosts: this agent's name and peer address, the store, the timings.
	Host              string        `yaml:"host"`
	PeerListen        string        `yaml:"peer-listen"`
	PeerCert          string        `yaml:"peer-cert"`
	PeerKey           string        `yaml:"peer-key"`
	PeerCA            string        `yaml:"peer-ca"`
	EtcdEndpoints     string        `yaml:"etcd-endpoints"`
	EtcdCert          string        `yaml:"etcd-cert"`
	EtcdKey           string        `yaml:"etcd-key"`
	EtcdCA            string        `yaml:"etcd-ca"`
	EtcdServe         string        `yaml:"etcd-serve"`
	HeartbeatInterval time.Duration `yaml:"heartbeat-interval"`
	HeartbeatTimeout  time.Duration `yaml:"heartbeat-timeout"`
	LeaseTTL          time.Duration `yaml:"lease-ttl"`
}

const usage = `lockstepd runs lockstep's agent: it keeps QEMU VMs protected in COLO lockstep, fails them
over and re-protects them by itself, and serves the gRPC API that lockstepctl talks to.

Usage:
  lockstepd [flags]

Examples:
  # The defaults: state in /var/lib/lockstep, the pairs' specs in an etcd server inside
  # lockstepd (loopback only, data in /var/lib/lockstep/_etcd), API on
  # /run/lockstep/lockstepd.sock (mode 0600).
  lockstepd

  # One host, the specs in an etcd cluster of your own.
  lockstepd --etcd-endpoints https://10.0.0.9:2379 --etcd-cert c.pem --etcd-key c.key --etcd-ca ca.pem

  # A test instance with its own folders and Prometheus metrics on loopback.
  lockstepd --state-dir /tmp/ls/state --listen unix:///tmp/ls/api.sock --metrics-listen 127.0.0.1:9464

  # TCP with mutual TLS.
  lockstepd --listen tcp://0.0.0.0:7443 --tls-cert agent.pem --tls-key agent.key --tls-ca ca.pem

  # Certificates for two hosts and the store's host, from a test CA (see lockstepctl certs):
  lockstepctl certs --dir /etc/lockstep/pki --host hosta=10.0.0.1 --host hostb=10.0.0.2 --host etcd=10.0.0.9

  # Pairs spanning two hosts: this host is "hosta", its peers reach it on 10.0.0.1:7444, the
  # pairs' specs and primary leases live in etcd; everything over mutual TLS with the host's
  # certificate (the peer link, the store, and the pairs' replication channels).
  lockstepd --host hosta --peer-listen 10.0.0.1:7444 \
    --peer-cert hosta.pem --peer-key hosta.key --peer-ca ca.pem \
    --etcd-endpoints https://10.0.0.9:2379 --etcd-cert hosta.pem --etcd-key hosta.key --etcd-ca ca.pem

  # The host of the coordination store itself: an etcd server inside lockstepd, over TLS, that
  # accepts only clients with a certificate from the CA.
  lockstepd --etcd-serve https://10.0.0.9:2379 --etcd-cert etcd.pem --etcd-key etcd.key --etcd-ca ca.pem

The peer link and the store carry who may fail a VM over: on an address other hosts can reach
they need TLS, and plaintext there only comes with an explicit --insecure. A host certificate
names its host (a URI SAN lockstep://host/NAME, or a DNS SAN, and the subject common name NAME)
and lists the host's addresses as IP SANs; an agent takes peer requests for a pair only from
the host that the pair's placement names opposite its own side. The pairs' replication channels
(migration, NBD, mirror and compare) are encrypted with the same certificate when the pair's
sides run on two hosts (tunable replication_tls: auto, on, off).

SIGTERM or SIGINT stops the agent; its QEMUs keep running and the next agent adopts them, so
restarting or upgrading lockstepd fails nothing over. (A QEMU in COLO releases nothing its
secondary did not produce too, so it needs no agent to stay safe; a secondary takes over from
a primary whose agent is gone only once checkpoints stop arriving.)

Flags:
`

func main() {
	if len(os.Args) > 1 && os.Args[1] == "fence-keeper" {
		os.Exit(runFenceKeeper(os.Args[2:]))
	}
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	cfg := config{
		StateDir: "/var/lib/lockstep", OverlayDir: "/dev/shm/lockstep", Listen: "unix:///run/lockstep/lockstepd.sock",
		LogFormat: "text", LogLevel: "info", CheckInterval: 100 * time.Millisecond, CheckTimeout: 2 * time.Second,
	}
	fs := flag.NewFlagSet("lockstepd", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	configFile := fs.String("config", "", "YAML file with settings (keys are the flag names); flags given on the command line win")
	fs.StringVar(&cfg.StateDir, "state-dir", cfg.StateDir, "folder for the pairs' specs, state and QEMU runtime files")
	fs.StringVar(&cfg.OverlayDir, "overlay-dir", cfg.OverlayDir, "folder for the secondaries' disk overlays, emptied at every checkpoint (tmpfs is best)")
	fs.StringVar(&cfg.Listen, "listen", cfg.Listen, "API address: unix:///path or tcp://host:port (TCP needs --tls-* or --insecure)")
	fs.BoolVar(&cfg.Insecure, "insecure", false, "allow plaintext on addresses other hosts can reach: a TCP API listener, --peer-listen and http:// etcd URLs without TLS")
	fs.StringVar(&cfg.TLSCert, "tls-cert", "", "server certificate (PEM) for a TCP listener")
	fs.StringVar(&cfg.TLSKey, "tls-key", "", "server key (PEM)")
	fs.StringVar(&cfg.TLSCA, "tls-ca", "", "CA (PEM) that client certificates must chain to")
	fs.StringVar(&cfg.MetricsListen, "metrics-listen", "", "address for Prometheus metrics at /metrics (off when empty)")
	fs.BoolVar(&cfg.Pprof, "pprof", false, "also serve Go's profiles at /debug/pprof/ on the metrics address (for finding what the agent spends its CPU on)")
	fs.StringVar(&cfg.LogFormat, "log-format", cfg.LogFormat, "log format: text or json")
	fs.StringVar(&cfg.LogLevel, "log-level", cfg.LogLevel, "log level: debug, info, warn or error")
	fs.DurationVar(&cfg.CheckInterval, "check-interval", cfg.CheckInterval, "how often each QEMU's health is checked over QMP")
	fs.DurationVar(&cfg.CheckTimeout, "check-timeout", cfg.CheckTimeout, "a QEMU that does not answer a check within this is taken as hung")
	fs.StringVar(&cfg.Host, "host", "", "this agent's host name (default: the machine's host name): pair placements name hosts so; a placement that names no host is this one")
	fs.StringVar(&cfg.PeerListen, "peer-listen", "", "host:port for the PeerService of the agents of other hosts; needed for pairs that span two hosts (mutual TLS with --peer-cert, or --insecure)")
	fs.StringVar(&cfg.PeerCert, "peer-cert", "", "this host's certificate (PEM) for the peer link, both ways, and for its QEMUs' encrypted replication; default with --peer-listen: --tls-cert, if that is a host certificate")
	fs.StringVar(&cfg.PeerKey, "peer-key", "", "key (PEM) of --peer-cert (default: --tls-key, as --peer-cert)")
	fs.StringVar(&cfg.PeerCA, "peer-ca", "", "CA (PEM) that the other hosts' certificates must chain to (default: --tls-ca, as --peer-cert)")
	fs.StringVar(&cfg.EtcdEndpoints, "etcd-endpoints", "", "comma-separated etcd client URLs of the coordination store, which holds the pairs' specs, leases and primary records; empty: an etcd server inside lockstepd on loopback, data in the state folder")
	fs.StringVar(&cfg.EtcdCert, "etcd-cert", "", "client certificate (PEM) for etcd over TLS; with an https --etcd-serve also the server's certificate")
	fs.StringVar(&cfg.EtcdKey, "etcd-key", "", "key (PEM) of --etcd-cert")
	fs.StringVar(&cfg.EtcdCA, "etcd-ca", "", "CA (PEM) of the etcd servers; with an https --etcd-serve also the CA that clients' certificates must chain to (clients without one are refused)")
	fs.StringVar(&cfg.EtcdServe, "etcd-serve", "", "serve an etcd server inside lockstepd at this client URL, data in the state folder (e.g. https://10.0.0.9:2379 with --etcd-cert, --etcd-key, --etcd-ca)")
	fs.DurationVar(&cfg.HeartbeatInterval, "heartbeat-interval", 100*time.Millisecond, "how often the two sides of a pair exchange heartbeats")
	fs.DurationVar(&cfg.HeartbeatTimeout, "heartbeat-timeout", 500*time.Millisecond, "a peer not heard from for this long is unreachable")
	fs.DurationVar(&cfg.LeaseTTL, "lease-ttl", time.Second, "the primary lease's time to live, whole seconds (a lost host fails over about this long after it died)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "lockstepd: unexpected argument %q (see --help)\n", fs.Arg(0))
		return 2
	}
	if *configFile != "" {
		if err := loadConfig(*configFile, &cfg, fs); err != nil {
			fmt.Fprintf(os.Stderr, "lockstepd: %v\n", err)
			return 2
		}
	}
	if cfg.Pprof && cfg.MetricsListen == "" {
		fmt.Fprintln(os.Stderr, "lockstepd: --pprof serves the profiles on the metrics address: give --metrics-listen too")
		return 2
	}
	log, err := newLogger(cfg.LogFormat, cfg.LogLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "lockstepd: %v\n", err)
		return 2
	}
	peerTLS, err := loadPeerTLS(cfg)
	if err == nil {
		err = checkPlaintext(cfg, peerTLS != nil)
	}
	var etcdTLS *coord.EmbeddedTLS
	if err == nil {
		etcdTLS, err = embeddedTLS(cfg)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "lockstepd: %v\n", err)
		return 2
	}
	lis, creds, err := listen(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "lockstepd: %v\n", err)
		return 2
	}
	watchCfg := checkpoint.WatchConfig{Interval: cfg.CheckInterval, Timeout: cfg.CheckTimeout}
	var opts []grpc.ServerOption
	if creds != nil {
		opts = append(opts, grpc.Creds(creds))
	}
	srv := grpc.NewServer(opts...)
	var emb *coord.Embedded
	// Without --etcd-endpoints the store is an etcd server inside lockstepd (loopback only unless
	// --etcd-serve says where), its data in the state folder under "_etcd", a name no pair can
	// have.
	if cfg.EtcdServe != "" || cfg.EtcdEndpoints == "" {
		url := cfg.EtcdServe
		emb, err = coord.StartEmbedded(coord.EmbeddedConfig{Dir: filepath.Join(cfg.StateDir, "_etcd"), ClientURL: url, Log: log, TLS: etcdTLS})
		if err != nil {
			lis.Close()
			log.Error("cannot start the embedded etcd server", "err", err)
			return 1
		}
		defer emb.Close()
		log.Info("etcd server inside lockstepd", "endpoints", emb.Endpoints())
	}
	host, err := thisHost(cfg)
	if err != nil {
		lis.Close()
		fmt.Fprintf(os.Stderr, "lockstepd: %v\n", err)
		return 2
	}
	agent, cleanup, err := startAgent(cfg, host, emb, peerTLS, log, watchCfg)
	if err != nil {
		lis.Close()
		fmt.Fprintf(os.Stderr, "lockstepd: %v\n", err)
		return 2
	}
	pb.RegisterPairServiceServer(srv, &controller.PairServer{Agent: agent})
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus(pb.PairService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	reflection.Register(srv)

	var metrics *http.Server
	if cfg.MetricsListen != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "text/plain; version=0.0.4")
			agent.WriteMetrics(w)
		})
		if cfg.Pprof {
			mux.HandleFunc("/debug/pprof/", pprof.Index)
			mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
			mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
			mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		}
		ml, err := net.Listen("tcp", cfg.MetricsListen)
		if err != nil {
			log.Error("metrics listener", "err", err)
			cleanup()
			lis.Close()
			return 2
		}
		metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = metrics.Serve(ml) }()
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(lis) }()
	log.Info("lockstepd serving", "listen", cfg.Listen, "state-dir", cfg.StateDir, "host", host, "pairs", len(agent.List()))
	code := 0
	select {
	case s := <-sigs:
		log.Info("stopping; the VMs keep running and the next agent adopts them", "signal", s.String())
	case err := <-serveErr:
		log.Error("API server stopped", "err", err)
		code = 1
	}
	hs.Shutdown()
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(3 * time.Second):
		srv.Stop() // watch streams never end by themselves
	}
	if metrics != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = metrics.Shutdown(ctx)
		cancel()
	}
	cleanup()
	return code
}

// startAgent starts the agent: the store client (and the client of the earlier single-host
// layout's keys, whose pairs the agent moves), the agent itself and, with --peer-listen, the
// PeerService listener for the agents of other hosts. The returned function stops them; the
// QEMUs keep running.
func startAgent(cfg config, host string, emb *coord.Embedded, peerTLS *controller.PeerTLS, log *slog.Logger, watch checkpoint.WatchConfig) (*controller.Agent, func(), error) {
	store, endpoints, err := openStore(cfg, emb, log, "")
	if err != nil {
		return nil, nil, err
	}
	legacy, _, err := openStore(cfg, emb, log, legacyPrefix(host))
	if err != nil {
		store.Close()
		return nil, nil, err
	}
	var pl net.Listener
	peerAddr := ""
	if cfg.PeerListen != "" {
		pl, err = net.Listen("tcp", cfg.PeerListen)
		if err != nil {
			legacy.Close()
			store.Close()
			return nil, nil, fmt.Errorf("--peer-listen %s: %w", cfg.PeerListen, err)
		}
		peerAddr = pl.Addr().String()
	}
	keeper, err := startFenceKeeper(cfg.StateDir, log)
	if err != nil {
		if pl != nil {
			pl.Close()
		}
		legacy.Close()
		store.Close()
		return nil, nil, err
	}
	agent, err := controller.NewAgent(controller.AgentConfig{
		Host: host, PeerAddr: peerAddr, StateDir: cfg.StateDir, OverlayDir: cfg.OverlayDir, Store: store, Legacy: legacy, Log: log, Watch: watch,
		Fence: keeper, PeerTLS: peerTLS,
		HeartbeatInterval: cfg.HeartbeatInterval, HeartbeatTimeout: cfg.HeartbeatTimeout, LeaseTTL: cfg.LeaseTTL,
	})
	if err != nil {
		if pl != nil {
			pl.Close()
		}
		keeper.Close()
		legacy.Close()
		store.Close()
		return nil, nil, err
	}
	var psrv *grpc.Server
	if pl != nil {
		// The peer service has its own listener: the agents' network, not the operators'.
		var opts []grpc.ServerOption
		if peerTLS != nil {
			creds, err := agent.PeerServerCredentials()
			if err != nil {
				pl.Close()
				agent.Close()
				keeper.Close()
				legacy.Close()
				store.Close()
				return nil, nil, err
			}
			opts = append(opts, grpc.Creds(creds))
		}
		psrv = grpc.NewServer(opts...)
		pb.RegisterPeerServiceServer(psrv, &controller.PeerServer{Agent: agent})
		go func() { _ = psrv.Serve(pl) }()
	}
	if peerTLS != nil && !slices.Contains(peerTLS.Names(), host) {
		log.Warn("the peer certificate does not name this host: the other hosts' agents will refuse it", "host", host, "certificate", peerTLS.Names())
	}
	log.Info("agent", "host", host, "peer-listen", peerAddr, "peer-tls", peerTLS != nil, "etcd", endpoints, "embedded", emb != nil)
	return agent, func() {
		if psrv != nil {
			psrv.Stop()
		}
		agent.Close()
		keeper.Close()
		legacy.Close()
		store.Close()
	}, nil
}

// legacyPrefix is where the single-host agent of earlier versions kept its pairs in the store;
// the agent moves them to the common layout when it starts.
func legacyPrefix(host string) string { return coord.DefaultPrefix + "single/" + host + "/" }

// thisHost is --host, else the machine's host name.
func thisHost(cfg config) (string, error) {
	if cfg.Host != "" {
		return cfg.Host, nil
	}
	h, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("--host: %w", err)
	}
	return h, nil
}

// openStore connects to the coordination store (--etcd-endpoints, else the embedded server),
// its keys under prefix (coord.DefaultPrefix if empty).
func openStore(cfg config, emb *coord.Embedded, log *slog.Logger, prefix string) (*coord.Etcd, []string, error) {
	var endpoints []string
	for _, e := range strings.Split(cfg.EtcdEndpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			endpoints = append(endpoints, e)
		}
	}
	if len(endpoints) == 0 && emb != nil {
		endpoints = emb.Endpoints()
	}
	ec := coord.EtcdConfig{Endpoints: endpoints, Log: log, Prefix: prefix}
	if cfg.EtcdCert != "" || cfg.EtcdKey != "" || cfg.EtcdCA != "" {
		t, err := coord.TLSConfig(cfg.EtcdCert, cfg.EtcdKey, cfg.EtcdCA)
		if err != nil {
			return nil, nil, fmt.Errorf("--etcd-cert/--etcd-key/--etcd-ca: %w", err)
		}
		ec.TLS = t
	}
	store, err := coord.NewEtcd(ec)
	if err != nil {
		return nil, nil, err
	}
	return store, endpoints, nil
}

// loadConfig reads the YAML file into cfg, except for flags set on the command line.
func loadConfig(path string, cfg *config, fs *flag.FlagSet) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var fromFile config
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(&fromFile); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	// Keep command-line values: re-apply them after the file.
	var raw map[string]any
	_ = yaml.Unmarshal(b, &raw)
	saved := *cfg
	for k := range raw {
		if set[k] {
			continue
		}
		switch k {
		case "state-dir":
			saved.StateDir = fromFile.StateDir
		case "overlay-dir":
			saved.OverlayDir = fromFile.OverlayDir
		case "listen":
			saved.Listen = fromFile.Listen
		case "insecure":
			saved.Insecure = fromFile.Insecure
		case "tls-cert":
			saved.TLSCert = fromFile.TLSCert
		case "tls-key":
			saved.TLSKey = fromFile.TLSKey
		case "tls-ca":
			saved.TLSCA = fromFile.TLSCA
		case "metrics-listen":
			saved.MetricsListen = fromFile.MetricsListen
		case "pprof":
			saved.Pprof = fromFile.Pprof
		case "log-format":
			saved.LogFormat = fromFile.LogFormat
		case "log-level":
			saved.LogLevel = fromFile.LogLevel
		case "check-interval":
			saved.CheckInterval = fromFile.CheckInterval
		case "check-timeout":
			saved.CheckTimeout = fromFile.CheckTimeout
		case "host":
			saved.Host = fromFile.Host
		case "peer-listen":
			saved.PeerListen = fromFile.PeerListen
		case "peer-cert":
			saved.PeerCert = fromFile.PeerCert
		case "peer-key":
			saved.PeerKey = fromFile.PeerKey
		case "peer-ca":
			saved.PeerCA = fromFile.PeerCA
		case "etcd-endpoints":
			saved.EtcdEndpoints = fromFile.EtcdEndpoints
		case "etcd-cert":
			saved.EtcdCert = fromFile.EtcdCert
		case "etcd-key":
			saved.EtcdKey = fromFile.EtcdKey
		case "etcd-ca":
			saved.EtcdCA = fromFile.EtcdCA
		case "etcd-serve":
			saved.EtcdServe = fromFile.EtcdServe
		case "heartbeat-interval":
			saved.HeartbeatInterval = fromFile.HeartbeatInterval
		case "heartbeat-timeout":
			saved.HeartbeatTimeout = fromFile.HeartbeatTimeout
		case "lease-ttl":
			saved.LeaseTTL = fromFile.LeaseTTL
		}
	}
	*cfg = saved
	return nil
}

func newLogger(format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	o := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, o)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, o)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

// listen opens the API listener: a unix socket (mode 0600), or TCP with mutual TLS or with an
// explicit --insecure.
func listen(cfg config) (net.Listener, credentials.TransportCredentials, error) {
	switch {
	case strings.HasPrefix(cfg.Listen, "unix://"):
		path := strings.TrimPrefix(cfg.Listen, "unix://")
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, nil, err
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, nil, fmt.Errorf("--listen %s: another agent is serving there", cfg.Listen)
		}
		_ = os.Remove(path)
		old := syscall.Umask(0o177)
		l, err := net.Listen("unix", path)
		syscall.Umask(old)
		if err != nil {
			return nil, nil, fmt.Errorf("--listen %s: %w", cfg.Listen, err)
		}
		return l, nil, os.Chmod(path, 0o600)
	case strings.HasPrefix(cfg.Listen, "tcp://"):
		addr := strings.TrimPrefix(cfg.Listen, "tcp://")
		var creds credentials.TransportCredentials
		switch {
		case cfg.TLSCert != "" || cfg.TLSKey != "" || cfg.TLSCA != "":
			if cfg.TLSCert == "" || cfg.TLSKey == "" || cfg.TLSCA == "" {
				return nil, nil, errors.New("mutual TLS needs --tls-cert, --tls-key and --tls-ca together")
			}
			certPEM, err := os.ReadFile(cfg.TLSCert)
			if err != nil {
				return nil, nil, fmt.Errorf("--tls-cert: %w", err)
			}
			keyPEM, err := os.ReadFile(cfg.TLSKey)
			if err != nil {
				return nil, nil, fmt.Errorf("--tls-key: %w", err)
			}
			cert, err := tls.X509KeyPair(certPEM, keyPEM)
			if err != nil {
				return nil, nil, fmt.Errorf("--tls-cert %s, --tls-key %s: %w", cfg.TLSCert, cfg.TLSKey, err)
			}
			caPEM, err := os.ReadFile(cfg.TLSCA)
			if err != nil {
				return nil, nil, fmt.Errorf("--tls-ca: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(caPEM) {
				return nil, nil, fmt.Errorf("--tls-ca %s: no certificate in it", cfg.TLSCA)
			}
			creds = credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool,
				ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12})
		case !cfg.Insecure:
			return nil, nil, fmt.Errorf("--listen %s: TCP needs mutual TLS (--tls-cert, --tls-key, --tls-ca) or an explicit --insecure", cfg.Listen)
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, nil, fmt.Errorf("--listen %s: %w", cfg.Listen, err)
		}
		return l, creds, nil
	}
	return nil, nil, fmt.Errorf("--listen %q: want unix:///path or tcp://host:port", cfg.Listen)
}
