package main

import (
	"fmt"
	"net"
	"os"
)

// notifySocketEnv names systemd's notification socket (sd_notify(3)); the unit runs
// hwkms with Type=notify, so systemd, and kubelet ordered after it, wait until the
// KMS socket accepts connections.
const notifySocketEnv = "NOTIFY_SOCKET"

// sdNotify sends state ("READY=1", "STOPPING=1", ...) to $NOTIFY_SOCKET. Without the
// variable it does nothing; an abstract socket name starts with '@'.
func sdNotify(state string) error {
	addr := os.Getenv(notifySocketEnv)
	if addr == "" {
		return nil
	}
	if addr[0] == '@' {
		addr = "\x00" + addr[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}
