package audit

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hwkms/hwkms/plugin/files"
)

// pageRecvBytes caps a Range answer of several keys: a larger page fails before its
// payload is read (gRPC checks the length prefix) and Run asks again for fewer keys, so
// memory stays bounded whatever the mix of value sizes. A single key may be up to
// singleRecvBytes (etcd's own limit on a value is --max-request-bytes, 1.5 MiB by
// default).
const (
	pageRecvBytes   = 4 << 20
	singleRecvBytes = 256 << 20
)

// Range retries: clientv3 retries a Range that failed with Unavailable (its default is
// 100 attempts); the audit allows a few, spaced by the backoff, all within one request's
// deadline.
const (
	rangeAttempts = 4
	retryBackoff  = 250 * time.Millisecond
)

// EtcdConfig says how to reach etcd, with kube-apiserver's flag names.
type EtcdConfig struct {
	Endpoints []string // --etcd-servers: http:// or https:// URLs (not mixed)
	CAFile    string   // --etcd-cafile: CA bundle verifying the servers (default: system roots)
	CertFile  string   // --etcd-certfile: client certificate
	KeyFile   string   // --etcd-keyfile: its private key
	// RequestTimeout bounds each Range, connection and retries included; default 30 s.
	RequestTimeout time.Duration
	// DialTimeout bounds one connection attempt (TCP, TLS and HTTP/2 handshakes), so an
	// endpoint that accepts and then says nothing fails with its cause rather than
	// running out the request's deadline; default 5 s, at most RequestTimeout.
	DialTimeout time.Duration
}

// EtcdClient is the audit's read-only view of etcd: it implements Ranger and nothing
// else. It reads with the official etcd v3 client (go.etcd.io/etcd/client/v3), and the
// only call it makes is KV.Get with a range, a limit and a revision: one
// etcdserverpb.KV/Range RPC per page. Nothing that would send another RPC is enabled:
// no endpoint auto-sync (MemberList), no user name or token (Auth.Authenticate), no
// version check (Maintenance.Status), and no lease, watch or keepalive is ever started.
// The client logs nothing (zap.NewNop).
type EtcdClient struct {
	cli       *clientv3.Client
	kv        clientv3.KV
	endpoints string // as given, for messages
	timeout   time.Duration
}

var _ Ranger = (*EtcdClient)(nil)

// DialEtcd checks the configuration, loads the TLS files and creates the client
// (connections are made by the first Range). Errors name the flag at fault.
func DialEtcd(c EtcdConfig) (*EtcdClient, error) {
	if len(c.Endpoints) == 0 {
		return nil, errors.New("--etcd-servers is required")
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		return nil, errors.New("--etcd-certfile and --etcd-keyfile go together")
	}
	var scheme string
	for _, ep := range c.Endpoints {
		u, err := url.Parse(ep)
		if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
			return nil, fmt.Errorf("--etcd-servers: %q is not an http:// or https:// URL", ep)
		}
		if u.Scheme == "http" && (c.CertFile != "" || c.CAFile != "") {
			return nil, fmt.Errorf("--etcd-servers: %s is plain http, but --etcd-cafile/--etcd-certfile are set: use https://", ep)
		}
		// One client serves every endpoint over one set of transport credentials, as
		// in kube-apiserver.
		if scheme != "" && u.Scheme != scheme {
			return nil, fmt.Errorf("--etcd-servers: %s is %s://, the endpoints before it %s://: use one scheme for every endpoint", ep, u.Scheme, scheme)
		}
		scheme = u.Scheme
	}
	var tlsConf *tls.Config
	if scheme == "https" {
		var err error
		if tlsConf, err = loadTLS(c); err != nil {
			return nil, err
		}
	}
	timeout := c.RequestTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	dial := c.DialTimeout
	if dial <= 0 {
		dial = 5 * time.Second
	}
	dial = min(dial, timeout)
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: c.Endpoints,
		TLS:       tlsConf,
		// Each connection attempt gets dial, then gRPC's backoff before the next.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.DefaultConfig, MinConnectTimeout: dial,
		})},
		Logger:             zap.NewNop(),
		MaxCallRecvMsgSize: singleRecvBytes, // the per-page cap is set on each Range
		MaxUnaryRetries:    rangeAttempts,
		BackoffWaitBetween: retryBackoff,
		// AutoSyncInterval 0 (no MemberList), RejectOldCluster false (no
		// Maintenance.Status), no Username/Password/Token (no Auth.Authenticate),
		// DialKeepAliveTime 0 (no keepalive pings): the zero values, kept so.
	})
	if err != nil {
		return nil, fmt.Errorf("--etcd-servers %s: %w", strings.Join(c.Endpoints, ","), err)
	}
	return &EtcdClient{
		cli:       cli,
		kv:        clientv3.NewKVFromKVClient(pageSized{clientv3.RetryKVClient(cli)}, cli),
		endpoints: strings.Join(c.Endpoints, ","),
		timeout:   timeout,
	}, nil
}

// pageSized adds two call options to each Range the KV sends (the only method the
// audit calls): the receive cap of a page (pageRecvBytes; singleRecvBytes for one key),
// and fail-fast. clientv3 waits for a ready connection by default, which turns an
// unreachable endpoint or a refused certificate into a bare "context deadline
// exceeded" once the request times out; failing fast returns gRPC's connection error,
// the cause, and clientv3 retries it at most rangeAttempts times.
type pageSized struct{ pb.KVClient }

func (p pageSized) Range(ctx context.Context, in *pb.RangeRequest, opts ...grpc.CallOption) (*pb.RangeResponse, error) {
	recv := pageRecvBytes
	if in.Limit == 1 {
		recv = singleRecvBytes
	}
	return p.KVClient.Range(ctx, in, append(opts, grpc.WaitForReady(false), grpc.MaxCallRecvMsgSize(recv))...)
}

func loadTLS(c EtcdConfig) (*tls.Config, error) {
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cafile: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--etcd-cafile %s: no PEM certificate in it", c.CAFile)
		}
		conf.RootCAs = pool
	}
	if c.CertFile != "" {
		certPEM, err := os.ReadFile(c.CertFile)
		if err != nil {
			return nil, fmt.Errorf("--etcd-certfile: %w", err)
		}
		keyPEM, err := files.ReadSecret(c.KeyFile, files.SecretOptions{MaxBytes: 64 << 10})
		if err != nil {
			return nil, fmt.Errorf("--etcd-keyfile: %w", err)
		}
		defer clear(keyPEM)
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			// X509KeyPair's errors describe the PEM blocks, never the key bytes.
			return nil, fmt.Errorf("--etcd-certfile %s / --etcd-keyfile %s: %w", c.CertFile, c.KeyFile, err)
		}
		conf.Certificates = []tls.Certificate{cert}
	}
	return conf, nil
}

// Close closes the client and its connections.
func (e *EtcdClient) Close() error { return e.cli.Close() }

// Range reads one page: the keys [key, end), at most limit, at revision (0: the
// latest), each request under its own deadline. An answer too large for one message is
// ErrTooLarge; an unreachable or refusing endpoint gives an error naming the endpoints
// and gRPC's cause.
func (e *EtcdClient) Range(ctx context.Context, key, end []byte, limit, revision int64) (Page, error) {
	rctx, cancel := context.WithTimeout(ctx, e.timeout)
	defer cancel()
	resp, err := e.kv.Get(rctx, string(key), clientv3.WithRange(string(end)), clientv3.WithLimit(limit), clientv3.WithRev(revision))
	if err != nil {
		return Page{}, e.rangeError(ctx, err, revision)
	}
	if resp.Header == nil {
		return Page{}, fmt.Errorf("etcd %s: a Range answer without a header (no revision)", e.endpoints)
	}
	p := Page{More: resp.More, Revision: resp.Header.Revision, KVs: make([]KV, len(resp.Kvs))}
	for i, kv := range resp.Kvs {
		p.KVs[i] = KV{Key: kv.Key, Value: kv.Value}
	}
	return p, nil
}

const checkFlags = "check --etcd-servers, and --etcd-cafile/--etcd-certfile/--etcd-keyfile for https"

func (e *EtcdClient) rangeError(ctx context.Context, err error, revision int64) error {
	var server rpctypes.EtcdError
	isServer := errors.As(err, &server)
	switch {
	case ctx.Err() != nil: // the caller's own cancellation or deadline
		return fmt.Errorf("etcd %s: %w", e.endpoints, ctx.Err())
	case errors.Is(err, rpctypes.ErrCompacted):
		return fmt.Errorf("etcd %s compacted revision %d during the audit (the walk took longer than kube-apiserver's compaction interval): run it again: %w", e.endpoints, revision, err)
	case !isServer && status.Code(err) == codes.ResourceExhausted:
		return fmt.Errorf("%w: %v", ErrTooLarge, err)
	case !isServer && status.Code(err) == codes.Unavailable:
		return fmt.Errorf("no etcd endpoint answered (%s): %s: %w", checkFlags, e.endpoints, err)
	case errors.Is(err, context.DeadlineExceeded), !isServer && status.Code(err) == codes.DeadlineExceeded:
		return fmt.Errorf("no answer from etcd %s within --etcd-request-timeout %s (%s): %w", e.endpoints, e.timeout, checkFlags, err)
	}
	return fmt.Errorf("etcd %s: %w", e.endpoints, err)
}
