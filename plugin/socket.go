package plugin

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"google.golang.org/grpc"
	kmsapi "k8s.io/kms/apis/v2"
	"k8s.io/kms/pkg/service"
)

// ErrSocketInUse means another process is serving on the configured socket.
var ErrSocketInUse = errors.New("another process is serving on the socket")

// maxRecvMsgSize bounds a request at the gRPC layer. A valid Decrypt carries at most
// 1 KiB of ciphertext, a 1 KiB key_id and 32 KiB of annotations (docs/contract.md).
// Oversize input up to this bound reaches the service and gets InvalidArgument like any
// other bad input; above it grpc-go refuses the message itself with ResourceExhausted
// before hwkms sees it, so a local client cannot make the plugin buffer megabytes.
const maxRecvMsgSize = 1 << 20

// SocketOptions configures the unix socket.
type SocketOptions struct {
	// Path of the socket file (kube-apiserver's endpoint is "unix://" + Path).
	Path string
	// Mode is applied to the socket file after it is created. The socket is created
	// with mode 0600 (umask 0177 while binding), so there is no window where it is
	// wider. Default 0600.
	Mode fs.FileMode
	// GID, if >= 0, becomes the socket's group (for a non-root kube-apiserver).
	GID int
	// Timeout is the gRPC connection timeout, as k8s.io/kms/pkg/service uses it, and
	// the longest any one request may run: a request without a deadline, or with a
	// later one, gets this one (kube-apiserver sends the provider timeout anyway).
	Timeout time.Duration
	// ShutdownTimeout bounds graceful shutdown: in-flight requests get this long to
	// finish before connections are closed. Default 5 s.
	ShutdownTimeout time.Duration
	// ServerOptions are extra gRPC server options (interceptors for metrics).
	ServerOptions []grpc.ServerOption
}

// Serve serves svc (KMS v2) on a unix socket until ctx is done, then shuts down
// gracefully and removes the socket. It refuses to start if another process answers
// on the socket, removes a stale socket file, and refuses to replace a non-socket file.
//
// The KMS v2 RPCs are translated by k8s.io/kms/pkg/service.NewGRPCService. Serve
// registers that GRPCService on a grpc.Server it creates itself, instead of calling
// GRPCService.ListenAndServe, because ListenAndServe creates the socket with the
// process umask (no way to make it 0600 from the start), sets no message-size limit,
// and offers no bounded shutdown.
//
// ready, if non-nil, is closed once the socket accepts connections.
func Serve(ctx context.Context, svc service.Service, opts SocketOptions, ready chan<- struct{}) error {
	if opts.Mode == 0 {
		opts.Mode = 0o600
	}
	if opts.ShutdownTimeout <= 0 {
		opts.ShutdownTimeout = 5 * time.Second
	}
	ln, err := Listen(opts.Path, opts.Mode, opts.GID)
	if err != nil {
		return err
	}
	// Removes the socket file, then releases the lock.
	defer ln.Close()

	srvOpts := append([]grpc.ServerOption{
		grpc.ConnectionTimeout(opts.Timeout),
		grpc.MaxRecvMsgSize(maxRecvMsgSize),
		grpc.ChainUnaryInterceptor(requestDeadline(opts.Timeout)),
	}, opts.ServerOptions...)
	gs := grpc.NewServer(srvOpts...)
	kmsapi.RegisterKeyManagementServiceServer(gs, service.NewGRPCService(opts.Path, opts.Timeout, svc))

	errc := make(chan error, 1)
	go func() { errc <- gs.Serve(ln) }()
	if ready != nil {
		close(ready)
	}
	select {
	case err := <-errc:
		return fmt.Errorf("serve %s: %w", opts.Path, err)
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() {
		gs.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(opts.ShutdownTimeout):
		gs.Stop()
		<-stopped
	}
	return nil
}

// requestDeadline bounds every request by d (when d > 0), so a client that sends no
// deadline cannot keep a handler, and a device call, waiting forever.
func requestDeadline(d time.Duration) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if d <= 0 {
			return handler(ctx, req)
		}
		ctx, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		return handler(ctx, req)
	}
}

// Listener is a unix socket listener that holds an exclusive lock on "<path>.lock" for
// its lifetime, so two hwkms processes can never both pass the stale-socket check and
// remove each other's socket. Close removes the socket file, then releases the lock.
type Listener struct {
	*net.UnixListener
	lock *os.File
}

// Close closes the listener, removes the socket file and releases the lock. Idempotent.
func (l *Listener) Close() error {
	err := l.UnixListener.Close() // unlinks the socket: we still hold the lock, so it is ours
	if l.lock != nil {
		l.lock.Close() // releases the flock
		l.lock = nil
	}
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// Listen creates the unix socket at path with the given mode and group (gid < 0 keeps
// the process group). It first takes an exclusive lock on "<path>.lock" (held until
// Close), then checks that nobody serves the socket and removes a stale one.
func Listen(path string, mode fs.FileMode, gid int) (*Listener, error) {
	if path == "" {
		return nil, errors.New("socket path is empty")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if gid >= 0 {
		if err := letGroupTraverse(filepath.Dir(path), gid); err != nil {
			return nil, err
		}
	}
	lock, err := lockSocket(path)
	if err != nil {
		return nil, err
	}
	ln, err := listenLocked(path, mode, gid)
	if err != nil {
		lock.Close()
		return nil, err
	}
	return &Listener{UnixListener: ln, lock: lock}, nil
}

// letGroupTraverse makes sure members of gid can pass through dir to reach the
// socket: a socket with mode 0660 and that group is useless inside a directory the
// group cannot search (systemd's RuntimeDirectory is root:root 0750). When neither
// others nor gid may search dir and this process owns it, dir gets group gid and g+x
// (its read and write bits are not widened); otherwise that is an error naming dir.
func letGroupTraverse(dir string, gid int) error {
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	perm := st.Mode().Perm()
	if perm&0o001 != 0 || (int(sys.Gid) == gid && perm&0o010 != 0) {
		return nil
	}
	if int(sys.Uid) != os.Geteuid() {
		return fmt.Errorf("socket directory %s (mode %04o, uid %d, gid %d) cannot be searched by socket group %d and belongs to another user: give that group search (x) permission on it", dir, perm, sys.Uid, sys.Gid, gid)
	}
	if int(sys.Gid) != gid {
		if err := os.Chown(dir, -1, gid); err != nil {
			return fmt.Errorf("socket directory %s: give it group %d so the socket group can reach the socket: %w", dir, gid, err)
		}
	}
	if err := os.Chmod(dir, st.Mode()&(fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky)|0o010); err != nil {
		return fmt.Errorf("socket directory %s: add group search permission: %w", dir, err)
	}
	return nil
}

// lockSocket takes the exclusive, non-blocking flock that guards path.
func lockSocket(path string) (*os.File, error) {
	f, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open socket lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s (lock %s.lock is held): %w", path, path, ErrSocketInUse)
		}
		return nil, fmt.Errorf("lock %s.lock: %w", path, err)
	}
	return f, nil
}

func listenLocked(path string, mode fs.FileMode, gid int) (*net.UnixListener, error) {
	if err := clearStaleSocket(path); err != nil {
		return nil, err
	}
	// The umask is process-wide; hwkms creates no other files while it binds.
	old := syscall.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("chown socket %s to gid %d: %w", path, gid, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod socket %s: %w", path, err)
	}
	return ln, nil
}

// CheckSocket reports ErrSocketInUse if another process serves path or holds its
// lock, without changing anything. serve calls it before opening devices, to fail fast.
func CheckSocket(path string) error {
	if f, err := os.OpenFile(path+".lock", os.O_RDWR|syscall.O_NOFOLLOW, 0); err == nil {
		defer f.Close()
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			return fmt.Errorf("%s (lock %s.lock is held): %w", path, path, ErrSocketInUse)
		}
		defer syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	}
	if conn, err := net.DialTimeout("unix", path, time.Second); err == nil {
		conn.Close()
		return fmt.Errorf("%s: %w", path, ErrSocketInUse)
	}
	return nil
}

// clearStaleSocket makes path free for a new socket: it fails if a process answers on
// it or if it is not a socket, and removes it if it is a socket nobody serves.
func clearStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check socket %s: %w", path, err)
	}
	if fi.Mode()&fs.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket; refusing to replace it", path)
	}
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		conn.Close()
		return fmt.Errorf("%s: %w", path, ErrSocketInUse)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("check whether %s is served: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}
