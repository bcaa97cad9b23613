package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/metrics"
)

func cmdServe(ctx context.Context, args []string, stderr io.Writer) error {
	fs := newFlags("serve", stderr)
	path := fs.String("config", "", "path of the hwkms config file (required)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *path == "" {
		return errors.New("serve: --config is required")
	}
	cfg, err := config.Load(*path)
	if err != nil {
		return err
	}
	return serve(ctx, cfg, *path, cfg.Logger(stderr), nil)
}

// serve opens the keyring, probes it, serves until ctx is done and reloads the keys on
// SIGHUP. ready, if not nil, is closed when the socket accepts connections.
func serve(ctx context.Context, cfg *config.Config, cfgPath string, log *slog.Logger, ready chan<- struct{}) error {
	return serveWith(ctx, cfg, cfgPath, log, serveHooks{ready: ready})
}

// serveHooks lets callers (dev mode, tests) follow serve's progress.
type serveHooks struct {
	// ready, if not nil, is closed when the socket accepts connections.
	ready chan<- struct{}
	// metricsAddr, if not nil, is called with the metrics listener's address once it
	// is bound (useful with port 0).
	metricsAddr func(net.Addr)
}

// serveWith is serve with hooks. On ctx done it shuts down in this order: stop
// accepting on the socket and let in-flight requests finish (at most
// cfg.ShutdownTimeout), remove the socket, stop the metrics listener, close every key.
func serveWith(ctx context.Context, cfg *config.Config, cfgPath string, log *slog.Logger, hooks serveHooks) error {
	mode, err := cfg.SocketMode()
	if err != nil {
		return err
	}
	gid, err := cfg.SocketGID()
	if err != nil {
		return err
	}
	if err := startPprof(log); err != nil {
		return err
	}
	// Fail fast, before touching a device, if another process serves the socket.
	if err := plugin.CheckSocket(cfg.Socket.Path); err != nil {
		return err
	}
	if err := cfg.RememberRefusedPINs(true); err != nil {
		return err
	}
	// Read before touching a device: an unreadable history refuses to start rather
	// than forget which key_ids were replaced.
	hist, err := config.OpenHistory(cfg.HistoryPath())
	if err != nil {
		return err
	}
	ring, err := config.OpenKeyringWithin(ctx, cfg, config.OpenTimeout)
	if err != nil {
		if config.PINRefused(err) {
			return fmt.Errorf("open keys: %w (%w: not restarting with the same PIN)", err, exitPINRefused)
		}
		return fmt.Errorf("open keys: %w", err)
	}
	config.LogMechanisms(log, ring)
	dropped, err := hist.Admit(ring.Primary().ID())
	if err != nil {
		closeKeys(log, ring, keyCloseTimeout)
		if cfgPath != "" {
			err = fmt.Errorf("config %s: %w", cfgPath, err)
		}
		return err
	}
	if dropped != "" {
		log.Warn("primary-key history is full; its oldest key_id is no longer protected from reuse", "dropped_key_id", dropped, "history", hist.Path(), "max", config.MaxHistory)
	}
	opts := plugin.Options{
		Logger:         log,
		HealthInterval: cfg.Health.Interval.D(),
		ProbeTimeout:   cfg.Health.Timeout.D(),
		DeviceReason:   metrics.DeviceReason(devices.Reason),
	}
	var m *metrics.Metrics
	if cfg.Metrics.Address != "" {
		m = metrics.New(version, devices)
		if err := m.RegisterAPIServerKeyHash(); err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		opts.Observer = m
	}
	svc := plugin.NewService(ring, opts)
	defer func() { closeKeys(log, svc.Keyring(), keyCloseTimeout) }()

	// The metrics listener outlives the KMS socket at shutdown, so /livez and /metrics
	// answer while in-flight requests drain.
	metricsCtx, stopMetrics := context.WithCancel(context.Background())
	defer stopMetrics()
	metricsDone := make(chan error, 1)
	metricsDone <- nil
	if m != nil {
		m.Watch(svc)
		ln, err := metrics.Listen(cfg.Metrics.Address)
		if err != nil {
			return err
		}
		<-metricsDone
		go func() { metricsDone <- metrics.Serve(metricsCtx, ln, metrics.Handler(m, svc)) }()
		log.Info("serving metrics and health", "address", ln.Addr().String(), "paths", "/metrics /healthz /livez")
		if hooks.metricsAddr != nil {
			hooks.metricsAddr(ln.Addr())
		}
	}
	defer func() {
		stopMetrics()
		if err := <-metricsDone; err != nil {
			log.Warn("metrics listener", "err", err)
		}
	}()

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	svc.ProbeNow(runCtx) // the first Status answers from a real probe
	go svc.Run(runCtx)
	if cfgPath != "" {
		rl := config.NewReloader(svc, cfg, cfgPath, log, hist)
		if m != nil {
			rl.OnReload = m.ObserveReload
		}
		hup := make(chan struct{}, 1)
		go forwardSIGHUP(runCtx, hup)
		go rl.Watch(runCtx, hup)
	}

	log.Info("serving KMS v2", "socket", cfg.Socket.Path, "primary_key_id", ring.Primary().ID(), "keys", len(cfg.Keys), "version", version)
	listening := make(chan struct{})
	notifyAddr := os.Getenv(notifySocketEnv)
	go func() {
		select {
		case <-listening:
		case <-runCtx.Done():
			return
		}
		if err := sdNotify(notifyAddr, "READY=1\nSTATUS=serving KMS v2 on "+cfg.Socket.Path); err != nil {
			log.Warn("telling systemd that hwkms is ready", "err", err)
		}
		if hooks.ready != nil {
			close(hooks.ready)
		}
		<-runCtx.Done()
		if err := sdNotify(notifyAddr, "STOPPING=1"); err != nil {
			log.Warn("telling systemd that hwkms stops", "err", err)
		}
	}()
	err = plugin.Serve(runCtx, svc, plugin.SocketOptions{
		Path:            cfg.Socket.Path,
		Mode:            mode,
		GID:             gid,
		Timeout:         cfg.Timeout.D(),
		ShutdownTimeout: cfg.ShutdownTimeout.D(),
	}, listening)
	if err == nil {
		log.Info("stopped serving; socket removed", "socket", cfg.Socket.Path)
	}
	return err
}

// devices gives the metrics what only the backends know, from the registry in
// plugin/config: device reason names and per-key device statistics.
var devices = metrics.Devices{
	Reason: config.DeviceReason,
	Stats:  func(k kek.KEK) metrics.KeyStats { return metrics.KeyStats(config.DeviceStats(k)) },
}

// keyCloseTimeout bounds closing the keys at shutdown. Closing waits for device calls
// still running; a hung HSM would otherwise keep the process alive until its
// supervisor kills it (systemd TimeoutStopSec=15s, after shutdownTimeout's drain).
const keyCloseTimeout = 5 * time.Second

// closeKeys closes ring, waiting at most d: a device call that never returns leaves
// its sessions to the process exit instead of holding up the shutdown.
func closeKeys(log *slog.Logger, ring io.Closer, d time.Duration) {
	done := make(chan error, 1)
	go func() { done <- ring.Close() }()
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case err := <-done:
		if err != nil {
			log.Warn("closing keys", "err", err)
			return
		}
		log.Info("keys closed")
	case <-timer.C:
		log.Warn("closing keys: device calls still running; exiting without waiting for them (the process exit releases the sessions)", "waited", d)
	}
}

// forwardSIGHUP turns SIGHUP into reload triggers until ctx is done.
func forwardSIGHUP(ctx context.Context, trigger chan<- struct{}) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			select {
			case trigger <- struct{}{}:
			default: // a reload is already pending
			}
		}
	}
}
