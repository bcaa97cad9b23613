package main

import (
	"fmt"
	"net"
)

// notifySocketEnv names systemd's notification socket (sd_notify(3)); the unit runs
// hwkms with Type=notify, so systemd, and kubelet ordered after it, wait until the
// KMS socket accepts connections.
const notifySocketEnv = "NOTIFY_SOCKET"

// sdNotify sends state ("READY=1", "STOPPING=1", ...) to addr, the value of
// $NOTIFY_SOCKET read when serve started. Without one it does nothing; an abstract
// socket name starts with '@'.
func sdNotify(addr, state string) error {
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
