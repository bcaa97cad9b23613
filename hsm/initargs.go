package hsm

// #include <stdlib.h>
import "C"

import (
	"fmt"
	"strings"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// maxInitArgs bounds Config.InitArgs; the NSS softoken's string is about 100 bytes.
const maxInitArgs = 4096

// validateInitArgs checks Config.InitArgs for Validate.
func (c Config) validateInitArgs(bad func(name, format string, args ...any)) {
	switch {
	case len(c.InitArgs) > maxInitArgs:
		bad("initArgs", "longer than %d bytes", maxInitArgs)
	case strings.IndexByte(c.InitArgs, 0) >= 0:
		bad("initArgs", "must not contain a NUL byte (C_Initialize gets it as a C string)")
	}
}

// sameInitArgs refuses a second configuration of an already loaded module with other
// C_Initialize arguments. A module is initialised once per process, so two different
// strings cannot both be honoured; the registry keeps one module per path.
func (m *module) sameInitArgs(initArgs string) error {
	if initArgs == m.initArgs {
		return nil
	}
	return mark(fmt.Errorf("hsm: module %q is already initialised in this process with initArgs %q, and another configuration asks for initArgs %q: every key on one module must use the same initArgs (C_Initialize runs once per process)",
		m.path, m.initArgs, initArgs), ErrModule)
}

// initialize calls C_Initialize with CKF_OS_LOCKING_OK and, when the module was loaded
// with initArgs, a NUL-terminated copy of them as CK_C_INITIALIZE_ARGS.pReserved. The
// copy lives in C memory for the duration of the call: PKCS#11 does not let the module
// keep pReserved (the NSS softoken parses the string during C_Initialize).
func (m *module) initialize() error {
	if m.initArgs == "" {
		return m.ctx.Initialize()
	}
	cs := C.CString(m.initArgs)
	defer C.free(unsafe.Pointer(cs))
	return m.ctx.Initialize(pkcs11.InitializeWithReserved(unsafe.Pointer(cs)))
}
