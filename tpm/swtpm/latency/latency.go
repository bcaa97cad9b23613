// Package latency puts a discrete TPM's speed in front of a fast TPM for tests and
// benchmarks: a proxy that forwards the raw TPM 2.0 command stream to swtpm (or any
// TPM socket), runs one command at a time across all its clients, as a real TPM does,
// and holds each response until the time the modelled device would have needed for
// that command has passed. It is a fixture, like package swtpm: `hwkms dev
// --dev-tpm-latency` and `make bench` use it, production configuration cannot name it
// (a served config only ever holds a device path or socket).
//
// The model (Profile) is per command: a fixed cost of any command, a cost per KiB the
// TPM hashes and ciphers (command plus response bytes), and the asymmetric operations
// a command implies (an ECDH for a salted StartAuthSession, a key derivation for
// CreatePrimary). SLB9670 derives these from a published measurement; see its doc.
//
// It does not own swtpm (package swtpm) or hwkms's TPM transport (package tpm).
package latency

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// TPM 2.0 command codes the model treats specially (Part 2, TPM_CC).
const (
	ccCreatePrimary    = 0x00000131
	ccStartAuthSession = 0x00000176
	ccCreate           = 0x00000153
	ccLoad             = 0x00000157
	ccUnseal           = 0x0000015E
	ccFlushContext     = 0x00000165
	ccHMAC             = 0x00000155
)

// Profile is the speed of a modelled TPM.
type Profile struct {
	// Name is the profile's flag value, e.g. "slb9670".
	Name string
	// Base is the cost of any command, transport included.
	Base time.Duration
	// PerKiB is the cost of each KiB of command and response the TPM processes.
	PerKiB time.Duration
	// ECDH is the extra cost of a StartAuthSession salted with an ECC key (one
	// ECDH on P-256 inside the TPM).
	ECDH time.Duration
	// KeyGen is the extra cost of CreatePrimary (an ECC P-256 key derived from the
	// hierarchy seed).
	KeyGen time.Duration
}

// SLB9670 models an Infineon OPTIGA TPM SLB 9670 on SPI at 43 MHz, from the wolfTPM
// project's published benchmark of that part (wolfTPM README.md, "TPM2 Benchmarks",
// "Run on Infineon OPTIGA SLB9670 at 43MHz"): RNG 14.033 KB/s, i.e. 2.28 ms per
// 32-byte TPM2_GetRandom, taken as the cost of any command; SHA256 136.763 KB/s, i.e.
// 7.3 ms per KiB hashed, taken as the cost per KiB processed; ECDHE 256 agree 232 ms
// per ECDH; ECC 256 key gen (from the hierarchy seed, that is CreatePrimary) 231 ms.
// The source has no line for TPM2_Load, TPM2_Unseal or TPM2_FlushContext: under this
// model a Load of a sealed seed (~300 bytes) costs ~4.5 ms, an Unseal ~2.8 ms and a
// FlushContext 2.3 ms. docs/BENCHMARKS.md records the derivation.
var SLB9670 = Profile{
	Name:   "slb9670",
	Base:   2280 * time.Microsecond,
	PerKiB: 7300 * time.Microsecond,
	ECDH:   232 * time.Millisecond,
	KeyGen: 231 * time.Millisecond,
}

// Profiles lists the profiles by name.
var Profiles = map[string]Profile{SLB9670.Name: SLB9670}

// Delay returns the modelled device time of one command given its bytes and the
// size of its response.
func (p Profile) Delay(cmd []byte, rspLen int) time.Duration {
	d := p.Base + time.Duration(int64(p.PerKiB)*int64(len(cmd)+rspLen)/1024)
	if len(cmd) < 10 {
		return d
	}
	switch binary.BigEndian.Uint32(cmd[6:10]) {
	case ccCreatePrimary:
		d += p.KeyGen
	case ccStartAuthSession:
		// tpmKey and bind handles, then TPM2B nonceCaller, then TPM2B encryptedSalt.
		if off := 18; len(cmd) >= off+2 {
			off += 2 + int(binary.BigEndian.Uint16(cmd[off:]))
			if len(cmd) >= off+2 && binary.BigEndian.Uint16(cmd[off:]) > 0 {
				d += p.ECDH
			}
		}
	}
	return d
}

// maxCommand bounds a command or response: TPM 2.0 devices take at most 4 KiB.
const maxCommand = 8192

// Proxy serves the TPM command stream on a unix socket and forwards it to an
// upstream TPM at the modelled speed.
type Proxy struct {
	// Device is the value for tpm.Config.Device: "unix:///path".
	Device string

	profile  Profile
	network  string
	address  string
	ln       net.Listener
	dir      string
	tpm      sync.Mutex // held while a command runs: one at a time, as in a TPM
	up       net.Conn   // guarded by tpm
	mu       sync.Mutex
	counts   map[uint32]int
	conns    map[net.Conn]struct{}
	wg       sync.WaitGroup
	closed   bool
	upstream func() (net.Conn, error)
}

// StartFor serves a proxy for the TPM at device, a tpm.Config.Device value of the
// form "unix:///path" or "tcp://host:port" (swtpm.Sim.Device).
func StartFor(device string, p Profile) (*Proxy, error) {
	switch {
	case strings.HasPrefix(device, "unix://"):
		return Start("unix", strings.TrimPrefix(device, "unix://"), p)
	case strings.HasPrefix(device, "tcp://"):
		return Start("tcp", strings.TrimPrefix(device, "tcp://"), p)
	}
	return nil, fmt.Errorf("latency: device %q: want unix:// or tcp://", device)
}

// Start serves a proxy for the upstream TPM at network/address ("unix" and a socket
// path, or "tcp" and host:port) on a unix socket in a new temporary directory.
func Start(network, address string, p Profile) (*Proxy, error) {
	dir, err := os.MkdirTemp("", "tpmlat-")
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, "tpm.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	x := &Proxy{
		Device: "unix://" + sock, profile: p, network: network, address: address, ln: ln, dir: dir,
		counts: map[uint32]int{}, conns: map[net.Conn]struct{}{},
	}
	x.upstream = func() (net.Conn, error) { return net.DialTimeout(network, address, 10*time.Second) }
	x.wg.Add(1)
	go x.accept()
	return x, nil
}

// Close stops the proxy and closes every connection. Idempotent.
func (x *Proxy) Close() error {
	x.mu.Lock()
	if x.closed {
		x.mu.Unlock()
		return nil
	}
	x.closed = true
	err := x.ln.Close()
	for c := range x.conns {
		c.Close()
	}
	x.mu.Unlock()
	x.wg.Wait()
	os.RemoveAll(x.dir)
	return err
}

// Counts returns how many commands of each command code the proxy forwarded.
func (x *Proxy) Counts() map[uint32]int {
	x.mu.Lock()
	defer x.mu.Unlock()
	out := make(map[uint32]int, len(x.counts))
	for k, v := range x.counts {
		out[k] = v
	}
	return out
}

// CommandName names the command codes hwkms sends on its request path, else hex.
func CommandName(cc uint32) string {
	switch cc {
	case ccCreatePrimary:
		return "CreatePrimary"
	case ccStartAuthSession:
		return "StartAuthSession"
	case ccCreate:
		return "Create"
	case ccLoad:
		return "Load"
	case ccUnseal:
		return "Unseal"
	case ccFlushContext:
		return "FlushContext"
	case ccHMAC:
		return "HMAC"
	}
	return fmt.Sprintf("0x%08x", cc)
}

func (x *Proxy) track(c net.Conn, add bool) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	if add {
		if x.closed {
			return false
		}
		x.conns[c] = struct{}{}
	} else {
		delete(x.conns, c)
	}
	return true
}

func (x *Proxy) accept() {
	defer x.wg.Done()
	for {
		c, err := x.ln.Accept()
		if err != nil {
			return
		}
		if !x.track(c, true) {
			c.Close()
			return
		}
		x.wg.Add(1)
		go func() {
			defer x.wg.Done()
			defer x.track(c, false)
			defer c.Close()
			x.serve(c)
		}()
	}
}

// serve forwards one client's commands. All clients share one upstream connection,
// as all users of a TPM device share the TPM: swtpm serves one connection at a time,
// and the TPM's state does not belong to a connection.
func (x *Proxy) serve(c net.Conn) {
	for {
		cmd, err := readFrame(c)
		if err != nil {
			return
		}
		rsp, err := x.run(cmd)
		if err != nil {
			return
		}
		if _, err := c.Write(rsp); err != nil {
			return
		}
	}
}

// run sends one command upstream with the TPM held and returns its response no
// earlier than the modelled device time after it started. A command whose client
// has gone still runs to its end, as in a TPM.
func (x *Proxy) run(cmd []byte) ([]byte, error) {
	x.tpm.Lock()
	defer x.tpm.Unlock()
	start := time.Now()
	if x.up == nil {
		up, err := x.upstream()
		if err != nil {
			return nil, err
		}
		if !x.track(up, true) {
			up.Close()
			return nil, net.ErrClosed
		}
		x.up = up
	}
	rsp, err := roundTrip(x.up, cmd)
	if err != nil {
		x.track(x.up, false)
		x.up.Close()
		x.up = nil
		return nil, err
	}
	if wait := x.profile.Delay(cmd, len(rsp)) - time.Since(start); wait > 0 {
		time.Sleep(wait)
	}
	x.mu.Lock()
	x.counts[binary.BigEndian.Uint32(cmd[6:10])]++
	x.mu.Unlock()
	return rsp, nil
}

func roundTrip(up net.Conn, cmd []byte) ([]byte, error) {
	if _, err := up.Write(cmd); err != nil {
		return nil, err
	}
	return readFrame(up)
}

// readFrame reads one TPM command or response: a 10-byte header whose bytes 2..6
// are the big-endian total size, then the rest.
func readFrame(r io.Reader) ([]byte, error) {
	var hdr [10]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < 10 || size > maxCommand {
		return nil, errors.New("latency: frame size out of range")
	}
	b := make([]byte, size)
	copy(b, hdr[:])
	if _, err := io.ReadFull(r, b[10:]); err != nil {
		return nil, err
	}
	return b, nil
}
