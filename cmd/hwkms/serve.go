package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/config"
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
	ring, err := config.OpenKeyring(ctx, cfg)
	if err != nil {
		return fmt.Errorf("open keys: %w", err)
	}
	svc := plugin.NewService(ring, plugin.Options{
		Logger:         log,
		HealthInterval: cfg.Health.Interval.D(),
		ProbeTimeout:   cfg.Health.Timeout.D(),
	})
	defer func() {
		if err := svc.Keyring().Close(); err != nil {
			log.Warn("closing keys", "err", err)
		}
	}()

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	svc.ProbeNow(runCtx) // the first Status answers from a real probe
	go svc.Run(runCtx)
	if cfgPath != "" {
		rl := config.NewReloader(svc, cfg, cfgPath, log)
		hup := make(chan struct{}, 1)
		go forwardSIGHUP(runCtx, hup)
		go rl.Watch(runCtx, hup)
	}

	log.Info("serving KMS v2", "socket", cfg.Socket.Path, "primary_key_id", ring.Primary().ID(), "keys", len(cfg.Keys), "version", version)
	err = plugin.Serve(runCtx, svc, plugin.SocketOptions{
		Path:            cfg.Socket.Path,
		Mode:            mode,
		GID:             gid,
		Timeout:         cfg.Timeout.D(),
		ShutdownTimeout: cfg.ShutdownTimeout.D(),
	}, ready)
	log.Info("stopped serving", "socket", cfg.Socket.Path)
	return err
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
