package tpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/google/go-tpm/tpm2"
)

const (
	// maxResponse bounds a TPM response; TPM 2.0 devices answer at most 4 KiB.
	maxResponse = 8192
	// defaultCommandTimeout bounds one command when the caller's ctx has no deadline.
	defaultCommandTimeout = 2 * time.Minute
	// maxBusyBackoff caps the wait between retries of TPM_RC_RETRY/YIELDED/TESTING.
	maxBusyBackoff = 20 * time.Millisecond
)

// conn is one connection to a TPM: a device file or a swtpm socket speaking the raw
// TPM 2.0 command stream (swtpm's server socket needs no extra framing). It
// implements go-tpm's transport.TPM. It is not safe for concurrent use; the KEK
// serialises access. ctx bounds every command sent while it is set.
type conn struct {
	dev  device
	nc   net.Conn // tcp and unix
	f    *os.File // device files
	ctx  context.Context
	dead bool
}

// dial opens the transport. It sends no command.
func dial(ctx context.Context, dev device) (*conn, error) {
	c := &conn{dev: dev, ctx: ctx}
	switch dev.network {
	case "file":
		f, err := os.OpenFile(dev.address, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w: %w", dev.address, errTransport, err)
		}
		c.f = f
	default:
		var d net.Dialer
		nc, err := d.DialContext(ctx, dev.network, dev.address)
		if err != nil {
			if ctxErr := ctx.Err(); ctxErr != nil {
				return nil, fmt.Errorf("dial %s: %w: %w: %w", dev, errTransport, ctxErr, err)
			}
			return nil, fmt.Errorf("dial %s: %w: %w", dev, errTransport, err)
		}
		c.nc = nc
	}
	return c, nil
}

func (c *conn) Close() error {
	c.dead = true
	if c.nc != nil {
		return c.nc.Close()
	}
	if c.f != nil {
		return c.f.Close()
	}
	return nil
}

func (c *conn) setDeadline(t time.Time) error {
	if c.nc != nil {
		return c.nc.SetDeadline(t)
	}
	return c.f.SetDeadline(t) // os.ErrNoDeadline when the device is not pollable
}

// Send implements transport.TPM: it sends one command and returns its response,
// resending while the TPM answers TPM_RC_RETRY, TPM_RC_YIELDED or TPM_RC_TESTING
// (the command was not executed, so resending the same bytes is valid, session
// nonces included) with a short exponential backoff bounded by ctx.
func (c *conn) Send(cmd []byte) ([]byte, error) {
	ctx := c.ctx
	if ctx == nil {
		ctx = context.Background()
	}
	backoff := time.Millisecond
	for {
		rsp, err := c.roundTrip(ctx, cmd)
		if err != nil {
			return nil, err
		}
		switch rc := tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:10])); rc {
		case tpm2.TPMRCRetry, tpm2.TPMRCYielded, tpm2.TPMRCTesting:
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return rsp, nil // let the caller see the TPM's warning
			case <-t.C:
			}
			backoff = min(2*backoff, maxBusyBackoff)
			continue
		}
		return rsp, nil
	}
}

// roundTrip writes cmd and reads one framed response. Any failure kills the
// connection: after a timeout the byte stream can no longer be trusted.
func (c *conn) roundTrip(ctx context.Context, cmd []byte) (rsp []byte, err error) {
	if c.dead {
		return nil, fmt.Errorf("%w: connection closed", errTransport)
	}
	if err := ctx.Err(); err != nil {
		// Nothing was sent: the connection is still in sync.
		return nil, fmt.Errorf("%w: %w", errTransport, err)
	}
	deadline, ctxDeadline := ctx.Deadline()
	if !ctxDeadline {
		deadline = time.Now().Add(defaultCommandTimeout)
	}
	defer func() {
		if err != nil {
			c.Close()
			ctxErr := ctx.Err()
			if ctxErr == nil && ctxDeadline && errors.Is(err, os.ErrDeadlineExceeded) {
				// The socket deadline is the ctx deadline; its timer may fire first.
				ctxErr = context.DeadlineExceeded
			}
			if ctxErr != nil {
				err = fmt.Errorf("%w: %w: %w", errTransport, ctxErr, err)
			} else {
				err = fmt.Errorf("%w: %w", errTransport, err)
			}
		}
	}()
	if err := c.setDeadline(deadline); err != nil && !errors.Is(err, os.ErrNoDeadline) {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { c.setDeadline(time.Unix(1, 0)) })
	defer stop()

	if c.f != nil {
		// A TPM character device takes a command in one write and returns the
		// whole response in one read.
		if _, err := c.f.Write(cmd); err != nil {
			return nil, err
		}
		buf := make([]byte, maxResponse)
		n, err := c.f.Read(buf)
		if err != nil {
			return nil, err
		}
		return checkFrame(buf[:n])
	}
	if _, err := c.nc.Write(cmd); err != nil {
		return nil, err
	}
	var hdr [10]byte
	if _, err := io.ReadFull(c.nc, hdr[:]); err != nil {
		return nil, err
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < 10 || size > maxResponse {
		return nil, fmt.Errorf("response size %d out of range", size)
	}
	rsp = make([]byte, size)
	copy(rsp, hdr[:])
	if _, err := io.ReadFull(c.nc, rsp[10:]); err != nil {
		return nil, err
	}
	return rsp, nil
}

func checkFrame(b []byte) ([]byte, error) {
	if len(b) < 10 {
		return nil, fmt.Errorf("short response (%d bytes)", len(b))
	}
	if size := binary.BigEndian.Uint32(b[2:6]); int(size) != len(b) {
		return nil, fmt.Errorf("response size field %d, read %d bytes", size, len(b))
	}
	return b, nil
}
