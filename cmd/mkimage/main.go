// Command mkimage builds hwkms's release artifacts that need more than the go tool:
// the OCI image (without a container daemon, with go-containerregistry) and the
// CycloneDX SBOMs of the image and the packages. `make image` and `make package` run
// it; see the Makefile for the flags they pass.
//
//	mkimage image -spec deploy/packaging/image.json -binary bin/hwkms -version V ...
//	mkimage sbom -in hwkms.cdx.json -artifact dist/hwkms_V_amd64.deb -purl pkg:deb/... -out F
//
// The image is the binary, the shared libraries `ldd BINARY` names and the dynamic
// loader, copied from the build host with their paths (symbolic links on the way, such
// as /lib64 -> usr/lib64 on a merged-/usr Debian, are kept as links), a minimal
// /etc/passwd and /etc/group, and the directories image.json lists. It is written
// twice: as an OCI image layout directory, and as one tar that is at the same time an
// OCI archive (oci-layout, index.json, blobs/) and a docker archive (manifest.json
// naming the same blobs), the format docker save writes since Docker 25: docker load,
// podman load and ctr import accept it.
//
// mkimage is its own module (cmd/mkimage/go.mod) so that go-containerregistry, nfpm
// and cyclonedx-gomod (the go.mod's tool directives) stay out of hwkms's go.mod: the
// plugin's dependency graph, and hence its SBOM, is only what the plugin links.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: mkimage image|sbom [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "image":
		err = cmdImage(os.Args[2:])
	case "sbom":
		err = cmdSBOM(os.Args[2:])
	default:
		fmt.Fprintf(os.Stderr, "mkimage: unknown command %q (image, sbom)\n", os.Args[1])
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "mkimage %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}
