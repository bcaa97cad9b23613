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

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/hwkms/hwkms/plugin/files"
)

// rangeMethod is the one etcd v3 RPC this client can call (etcdserverpb.KV/Range).
const rangeMethod = "/etcdserverpb.KV/Range"

// pageRecvBytes caps a Range answer of several keys: a larger page fails before its
// payload is read (gRPC checks the length prefix) and Run asks again for fewer keys, so
// memory stays bounded whatever the mix of value sizes. A single key may be up to
// singleRecvBytes (etcd's own limit on a value is --max-request-bytes, 1.5 MiB by
// default).
const (
	pageRecvBytes   = 4 << 20
	singleRecvBytes = 256 << 20
)

// EtcdConfig says how to reach etcd, with kube-apiserver's flag names.
type EtcdConfig struct {
	Endpoints []string // --etcd-servers: http:// or https:// URLs
	CAFile    string   // --etcd-cafile: CA bundle verifying the servers (default: system roots)
	CertFile  string   // --etcd-certfile: client certificate
	KeyFile   string   // --etcd-keyfile: its private key
	// RequestTimeout bounds each Range, connection included; default 30 s.
	RequestTimeout time.Duration
}

// EtcdClient is a read-only etcd v3 client: it implements Ranger and nothing else. It
// speaks etcd's gRPC API directly (the RangeRequest and RangeResponse messages of
// etcdserverpb, encoded with protowire), so the only RPC it can send is KV/Range. It
// tries the endpoints in order and stays on the first that answers.
type EtcdClient struct {
	endpoints []string
	conns     []*grpc.ClientConn
	cur       int
	timeout   time.Duration
}

var _ Ranger = (*EtcdClient)(nil)

// DialEtcd checks the configuration, loads the TLS files and prepares a connection per
// endpoint (connections are made by the first Range). Errors name the flag at fault.
func DialEtcd(c EtcdConfig) (*EtcdClient, error) {
	if len(c.Endpoints) == 0 {
		return nil, errors.New("--etcd-servers is required")
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		return nil, errors.New("--etcd-certfile and --etcd-keyfile go together")
	}
	var tlsConf *tls.Config
	for _, ep := range c.Endpoints {
		u, err := url.Parse(ep)
		if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
			return nil, fmt.Errorf("--etcd-servers: %q is not an http:// or https:// URL", ep)
		}
		if u.Scheme == "https" && tlsConf == nil {
			if tlsConf, err = loadTLS(c); err != nil {
				return nil, err
			}
		}
		if u.Scheme == "http" && (c.CertFile != "" || c.CAFile != "") {
			return nil, fmt.Errorf("--etcd-servers: %s is plain http, but --etcd-cafile/--etcd-certfile are set: use https://", ep)
		}
	}
	e := &EtcdClient{timeout: c.RequestTimeout}
	if e.timeout <= 0 {
		e.timeout = 30 * time.Second
	}
	for _, ep := range c.Endpoints {
		u, _ := url.Parse(ep)
		creds := insecure.NewCredentials()
		if u.Scheme == "https" {
			creds = credentials.NewTLS(tlsConf.Clone())
		}
		conn, err := grpc.NewClient("passthrough:///"+u.Host,
			grpc.WithTransportCredentials(creds),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
		if err != nil {
			e.Close()
			return nil, fmt.Errorf("--etcd-servers %s: %w", ep, err)
		}
		e.endpoints = append(e.endpoints, ep)
		e.conns = append(e.conns, conn)
	}
	return e, nil
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

// Close closes every connection.
func (e *EtcdClient) Close() error {
	var errs []error
	for _, c := range e.conns {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// Range sends one RangeRequest. It moves to the next endpoint when one is unreachable,
// and maps an answer too large for one message to ErrTooLarge.
func (e *EtcdClient) Range(ctx context.Context, key, end []byte, limit, revision int64) (Page, error) {
	req := encodeRangeRequest(key, end, limit, revision)
	var errs []string
	for range e.conns {
		page, err := e.rangeOnce(ctx, e.conns[e.cur], req, limit)
		if err == nil {
			return page, nil
		}
		st, _ := status.FromError(err)
		switch {
		case errors.Is(err, ErrTooLarge), ctx.Err() != nil:
			return Page{}, err
		case st.Code() == codes.OutOfRange && strings.Contains(st.Message(), "compacted"):
			return Page{}, fmt.Errorf("etcd %s compacted revision %d during the audit (the walk took longer than kube-apiserver's compaction interval): run it again: %w", e.endpoints[e.cur], revision, err)
		case st.Code() == codes.Unavailable || st.Code() == codes.DeadlineExceeded:
			errs = append(errs, fmt.Sprintf("%s: %s", e.endpoints[e.cur], st.Message()))
			e.cur = (e.cur + 1) % len(e.conns)
			continue
		}
		return Page{}, fmt.Errorf("etcd %s: %w", e.endpoints[e.cur], err)
	}
	return Page{}, fmt.Errorf("no etcd endpoint answered (check --etcd-servers, and --etcd-cafile/--etcd-certfile/--etcd-keyfile for https): %s", strings.Join(errs, "; "))
}

func (e *EtcdClient) rangeOnce(ctx context.Context, conn *grpc.ClientConn, req []byte, limit int64) (Page, error) {
	ctx, cancel := context.WithTimeout(ctx, e.timeout)
	defer cancel()
	in, out := rawMsg(req), rawMsg(nil)
	recv := pageRecvBytes
	if limit == 1 {
		recv = singleRecvBytes
	}
	if err := conn.Invoke(ctx, rangeMethod, &in, &out, grpc.MaxCallRecvMsgSize(recv)); err != nil {
		if status.Code(err) == codes.ResourceExhausted {
			return Page{}, fmt.Errorf("%w: %v", ErrTooLarge, err)
		}
		return Page{}, err
	}
	return decodeRangeResponse(out)
}

// rawMsg is a message already encoded (requests) or still to decode (responses).
type rawMsg []byte

// rawCodec passes rawMsg through. Its name is "proto" so that the content type is the
// one etcd expects (application/grpc+proto).
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) ([]byte, error) {
	m, ok := v.(*rawMsg)
	if !ok {
		return nil, fmt.Errorf("audit: cannot encode %T", v)
	}
	return *m, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	m, ok := v.(*rawMsg)
	if !ok {
		return fmt.Errorf("audit: cannot decode into %T", v)
	}
	*m = append((*m)[:0], data...) // grpc may reuse data after Unmarshal returns
	return nil
}

// encodeRangeRequest encodes etcdserverpb.RangeRequest{key=1, range_end=2, limit=3,
// revision=4}.
func encodeRangeRequest(key, end []byte, limit, revision int64) []byte {
	b := protowire.AppendTag(nil, 1, protowire.BytesType)
	b = protowire.AppendBytes(b, key)
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendBytes(b, end)
	if limit > 0 {
		b = protowire.AppendTag(b, 3, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(limit))
	}
	if revision > 0 {
		b = protowire.AppendTag(b, 4, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(revision))
	}
	return b
}

var errMalformed = errors.New("etcd sent a malformed RangeResponse")

// decodeRangeResponse decodes etcdserverpb.RangeResponse{header=1 {revision=3},
// kvs=2 repeated mvccpb.KeyValue {key=1, value=5}, more=3}. The KVs alias b.
func decodeRangeResponse(b []byte) (Page, error) {
	var p Page
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return Page{}, errMalformed
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return Page{}, errMalformed
			}
			rev, err := fieldVarint(v, 3)
			if err != nil {
				return Page{}, err
			}
			p.Revision, b = int64(rev), b[n:]
		case num == 2 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return Page{}, errMalformed
			}
			kv, err := decodeKeyValue(v)
			if err != nil {
				return Page{}, err
			}
			p.KVs, b = append(p.KVs, kv), b[n:]
		case num == 3 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return Page{}, errMalformed
			}
			p.More, b = v != 0, b[n:]
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return Page{}, errMalformed
			}
			b = b[n:]
		}
	}
	return p, nil
}

func decodeKeyValue(b []byte) (KV, error) {
	var kv KV
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return KV{}, errMalformed
		}
		b = b[n:]
		if (num == 1 || num == 5) && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return KV{}, errMalformed
			}
			if num == 1 {
				kv.Key = v
			} else {
				kv.Value = v
			}
			b = b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return KV{}, errMalformed
		}
		b = b[n:]
	}
	return kv, nil
}

// fieldVarint returns varint field num of message b (0 if absent).
func fieldVarint(b []byte, num protowire.Number) (uint64, error) {
	var out uint64
	for len(b) > 0 {
		n0, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, errMalformed
		}
		b = b[n:]
		if n0 == num && typ == protowire.VarintType {
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return 0, errMalformed
			}
			out, b = v, b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(n0, typ, b)
		if n < 0 {
			return 0, errMalformed
		}
		b = b[n:]
	}
	return out, nil
}
