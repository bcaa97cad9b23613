// Package audit answers "what is stored in etcd under which key?" before a KEK is
// destroyed: destroy a KEK while one object is still encrypted under it and that object
// is lost for good.
//
// It owns: reading a kube-apiserver EncryptionConfiguration (the resources it lists,
// with kube-apiserver's wildcard forms, and each rule's provider names; key secrets in
// the file are never kept), mapping resources to kube-apiserver's etcd key layout,
// classifying one stored value by its envelope prefix (KMS v2 with the key_id read from
// the clear EncryptedObject, KMS v1, aescbc, aesgcm, secretbox, unencrypted, or
// unreadable), walking etcd with paged Range requests into per-resource counters in
// bounded memory, the guard that key destroy runs (CheckDestroy), each key_id's
// hash in the form kube-apiserver's envelope metrics label it with
// (kek.APIServerKeyIDHash), and EtcdClient, its read-only view of etcd.
//
// It does not own decryption (it never decrypts, and never prints or logs a stored
// value), any device, the etcd protocol, or the command line (cmd/hwkms "storage
// audit", "key destroy" and "storage migrate", which rewrites objects through
// kubectl and then audits what is left).
//
// # Reading etcd
//
// EtcdClient reads with the official etcd v3 client, go.etcd.io/etcd/client/v3 (the
// client kube-apiserver itself uses), reached with kube-apiserver's --etcd-servers,
// --etcd-cafile, --etcd-certfile and --etcd-keyfile. The audit is read-only by
// construction: Run sees etcd only through the Ranger interface (one method, Range),
// and EtcdClient implements it with KV.Get (WithRange, WithLimit, WithRev), which is
// the etcdserverpb.KV/Range RPC and nothing else. Nothing in the client that sends
// another RPC is enabled: no endpoint auto-sync (Cluster.MemberList), no user or token
// (Auth.Authenticate), no version check (Maintenance.Status), no lease, watch or
// keepalive. The tests run whole audits against an in-process etcd gRPC server that
// records every method it receives and fail on any but KV/Range. The client's logger is
// zap.NewNop: it logs nothing, so no key or value can reach a log through it. (Only if
// the operator sets ETCD_CLIENT_DEBUG in the environment does the client package send
// gRPC's own connection logs to stderr: connection states and addresses, never a
// message.)
//
// Each Range has its own deadline (--etcd-request-timeout) and fails fast when no
// connection is ready, so an unreachable endpoint or a refused certificate gives gRPC's
// connection error (the cause) after at most a few retries, never a wait for ever; one
// connection attempt is bounded by EtcdConfig.DialTimeout. The walk pages: every page
// is read at the revision of the first (a consistent snapshot), resumes after the
// previous page's last key, and is sized for about 1 MiB; a page over 4 MiB is refused
// by the gRPC client from its length prefix, before its payload is read, and asked
// again with half the keys.
//
// # Stored formats, as kube-apiserver v1.37 (k8s.io/apiserver v0.37.2) writes them
//
// A value kube-apiserver encrypted starts with "k8s:enc:<kind>:<version>:<name>:",
// where name is the provider's name (kms) or the key's name (aescbc, aesgcm,
// secretbox): "k8s:enc:kms:v2:", "k8s:enc:kms:v1:", "k8s:enc:aescbc:v1:",
// "k8s:enc:aesgcm:v1:", "k8s:enc:secretbox:v1:". A KMS v2 value continues with a
// protobuf EncryptedObject (k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2):
//
//	1 encryptedData          bytes   (non-empty)
//	2 keyID                  string  (1..1024 bytes, in clear)
//	3 encryptedDEKSource     bytes   (1..1024 bytes)
//	4 annotations            map<string, bytes> (keys+values at most 32 KiB)
//	5 encryptedDEKSourceType enum    (0 AES_GCM_KEY, 1 HKDF_SHA256_XNONCE_AES_GCM_SEED)
//
// A value that kube-apiserver would reject with these rules is counted as unreadable.
// The identity provider stores the object as is: JSON ("{"), Kubernetes protobuf (the
// magic "k8s\x00") or CBOR (the self-describe tag 0xd9d9f7). Any other value is
// unreadable.
//
// # etcd key layout
//
// kube-apiserver stores an object at <etcd-prefix>/<resource prefix>/<namespace>/<name>
// (cluster-scoped: without namespace), --etcd-prefix defaulting to /registry. The
// resource prefix is the resource's name for built-in resources of any group
// (/registry/secrets, /registry/deployments), except replicationcontrollers
// (controllers), endpoints (services/endpoints), nodes (minions), services
// (services/specs) and ingresses (ingress); custom resources and the resources of
// apiextensions.k8s.io and apiregistration.k8s.io are at <group>/<resource>.
package audit
