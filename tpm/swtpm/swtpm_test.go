package swtpm_test

import (
	"context"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hwkms/hwkms/tpm/swtpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

func TestStartStopRestart(t *testing.T) {
	for _, opts := range []swtpm.Options{{}, {TCP: true}} {
		t.Run(map[bool]string{false: "unix", true: "tcp"}[opts.TCP], func(t *testing.T) {
			sim := swtpmtest.NewWith(t, opts)
			wantPrefix := map[bool]string{false: "unix:///", true: "tcp://127.0.0.1:"}[opts.TCP]
			if !strings.HasPrefix(sim.Device, wantPrefix) {
				t.Fatalf("Device = %q", sim.Device)
			}
			pid := sim.PID()
			if pid == 0 || syscall.Kill(pid, 0) != nil {
				t.Fatalf("PID %d not running", pid)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			device := sim.Device
			if err := sim.Restart(ctx); err != nil {
				t.Fatal(err)
			}
			if sim.Device != device {
				t.Errorf("Restart moved the device from %s to %s", device, sim.Device)
			}
			if syscall.Kill(pid, 0) == nil {
				t.Errorf("old pid %d still running after Restart", pid)
			}
			if err := sim.Kill(); err != nil {
				t.Fatal(err)
			}
			if sim.PID() != 0 {
				t.Errorf("PID after Kill = %d", sim.PID())
			}
			network, addr, _ := strings.Cut(sim.Device, "://")
			if c, err := net.Dial(network, addr); err == nil {
				c.Close()
				t.Errorf("swtpm still answers after Kill")
			}
			if err := sim.Resume(ctx); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(sim.Dir + "/tpm2-00.permall"); err != nil {
				t.Errorf("state file: %v", err)
			}
			if err := sim.Stop(); err != nil {
				t.Fatal(err)
			}
			if err := sim.Stop(); err != nil {
				t.Errorf("second Stop: %v", err)
			}
		})
	}
}

func TestStartHonoursContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if sim, err := swtpm.Start(ctx, t.TempDir()); err == nil {
		sim.Close()
		t.Fatal("Start with a cancelled context succeeded")
	}
}
