package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"strings"
)

// commit is set at build time with -ldflags "-X main.commit=..." (the Makefile passes
// git rev-parse HEAD). The build runs with -buildvcs=false in CI, so the binary's
// build info carries no vcs.revision of its own; "unknown" says nobody set it.
var commit = "unknown"

// cmdVersion prints the version and commit the binary was built from, the Go
// toolchain and every module linked into it (from runtime/debug.ReadBuildInfo), so an
// operator can match a running binary to a release and its SBOM.
func cmdVersion(args []string, stdout, stderr io.Writer) error {
	if len(args) != 0 {
		fmt.Fprintf(stderr, "hwkms version takes no arguments (got %q)\n", strings.Join(args, " "))
		return exitError(2)
	}
	bi, _ := debug.ReadBuildInfo()
	_, err := io.WriteString(stdout, versionText(version, commit, bi))
	return err
}

// versionText formats the version report. bi may be nil (a binary built without
// module support): the report then has the version, commit and runtime Go version only.
func versionText(version, commit string, bi *debug.BuildInfo) string {
	var b strings.Builder
	fmt.Fprintf(&b, "hwkms %s\n", version)
	fmt.Fprintf(&b, "commit: %s\n", commit)
	goVersion := runtime.Version()
	if bi != nil && bi.GoVersion != "" {
		goVersion = bi.GoVersion
	}
	fmt.Fprintf(&b, "go: %s %s/%s\n", goVersion, runtime.GOOS, runtime.GOARCH)
	if bi == nil {
		return b.String()
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "CGO_ENABLED", "-trimpath", "vcs.revision", "vcs.modified":
			fmt.Fprintf(&b, "build: %s=%s\n", s.Key, s.Value)
		}
	}
	fmt.Fprintf(&b, "module: %s %s\n", bi.Main.Path, moduleVersion(&bi.Main))
	for _, d := range bi.Deps {
		fmt.Fprintf(&b, "dep: %s %s\n", d.Path, moduleVersion(d))
	}
	return b.String()
}

// moduleVersion is a module's version, with its replacement if go.mod replaced it.
func moduleVersion(m *debug.Module) string {
	v := m.Version
	if v == "" {
		v = "(devel)"
	}
	if m.Replace != nil {
		v += " => " + m.Replace.Path + " " + moduleVersion(m.Replace)
	}
	return v
}
