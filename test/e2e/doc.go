// Package e2e is hwkms's acceptance suite: a real kube-apiserver and etcd store real
// Secrets through a real `hwkms serve` process whose KEK lives in SoftHSM2 or swtpm.
//
// Run it with `make e2e` from the repository root. That target builds what the suite
// needs and passes the paths in the environment:
//
//	E2E_HWKMS           the hwkms binary (bin/hwkms)
//	E2E_KUBE_APISERVER  kube-apiserver built from the k8s.io/kubernetes version in go.mod
//	E2E_KUBE_VERSION    that version, which the server must report
//	E2E_ETCD            etcd built from the go.etcd.io/etcd/server/v3 version in go.mod
//	E2E_KUBECTL         kubectl built from the same k8s.io/kubernetes version
//	E2E_KUBE_CONTROLLER_MANAGER
//	                    kube-controller-manager from the same version; the rotation
//	                    test runs its storage-version-migrator controller
//
// This directory is its own Go module, so kube-apiserver's dependency tree stays out
// of the plugin's go.mod. Its go.mod is also the wrapper module that builds the two
// servers, kubectl and kube-controller-manager: it requires k8s.io/kubernetes and
// replaces every staging module that k8s.io/kubernetes requires at v0.0.0 with the
// matching v0.x release, and lists the four as tool packages.
//
// Every test starts its own etcd, hwkms and kube-apiserver on loopback, with ports
// chosen at run time and state under a temporary directory, and stops each process by
// its PID in t.Cleanup. Nothing is downloaded at run time. The 12,000-Secret scale
// test runs only with E2E_SCALE=1 (`make e2e-scale`).
package e2e
