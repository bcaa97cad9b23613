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

// maxRecvMsgSize bounds a request: a Decrypt carries at most 1 KiB of ciphertext, a
// 1 KiB key_id and 32 KiB of annotations (DESIGN.md section 1), so 64 KiB is ample and
// a local client cannot make the plugin buffer megabytes.
const maxRecvMsgSize = 64 << 10

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
	// Timeout is the gRPC connection timeout, as k8s.io/kms/pkg/service uses it.
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
	// net.UnixListener removes the socket file on Close.
	defer ln.Close()

	srvOpts := append([]grpc.ServerOption{
		grpc.ConnectionTimeout(opts.Timeout),
		grpc.MaxRecvMsgSize(maxRecvMsgSize),
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

// Listen creates the unix socket at path with the given mode and group (gid < 0 keeps
// the process group), after checking that nobody serves it and removing a stale one.
func Listen(path string, mode fs.FileMode, gid int) (*net.UnixListener, error) {
	if path == "" {
		return nil, errors.New("socket path is empty")
	}
	if err := clearStaleSocket(path); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
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
