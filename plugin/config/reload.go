package config

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/hwkms/hwkms/plugin"
)

// Reload builds a new keyring from the config file at path and, only if it is complete
// and its primary passes a real round trip, swaps it into svc and closes the old one.
// On any error svc keeps serving with its current keyring, untouched. Settings other
// than keys (socket, log) need a restart; Reload reports when they changed.
//
// The old keyring's Close waits for requests still using it, so a reload never fails an
// in-flight request. Reload itself returns after the swap; closing the old keyring
// happens in the background.
func Reload(ctx context.Context, svc *plugin.Service, running *Config, path string, log *slog.Logger) (*Config, error) {
	cfg, err := Load(path)
	if err != nil {
		return nil, err
	}
	ring, err := OpenKeyring(ctx, cfg)
	if err != nil {
		return nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, cfg.Health.Timeout.D())
	h := plugin.Probe(pctx, ring.Primary())
	cancel()
	if !h.OK {
		ring.Close()
		return nil, fmt.Errorf("new primary key_id %s failed its health round trip: %w", h.KeyID, h.Err)
	}
	if running != nil && (running.Socket != cfg.Socket || running.Log != cfg.Log || running.Timeout != cfg.Timeout) {
		log.Warn("config reload: socket, log and timeout settings take effect only after a restart")
	}
	old := svc.SwapKeyring(ring, h)
	log.Info("config reloaded", "primary_key_id", ring.Primary().ID(), "keys", len(cfg.Keys), "previous_primary_key_id", old.Primary().ID())
	go func() {
		if err := old.Close(); err != nil {
			log.Warn("closing previous keyring", "err", err)
		}
	}()
	return cfg, nil
}
