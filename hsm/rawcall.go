package hsm

/*
#cgo linux LDFLAGS: -ldl
#cgo CFLAGS: -I${SRCDIR}/pkcs11h

#include <dlfcn.h>
#include <stdlib.h>

#define CK_PTR *
#define NULL_PTR 0
#define CK_DEFINE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION_POINTER(returnType, name) returnType (* name)
#define CK_CALLBACK_FUNCTION(returnType, name) returnType (* name)
#include "pkcs11.h"

// hw_function_list takes a new reference to the already loaded module at path
// (RTLD_NOLOAD: never loads a second copy) and returns its function list, or NULL
// (*handle NULL too) if the module is not loaded or has no C_GetFunctionList.
static CK_FUNCTION_LIST_PTR hw_function_list(const char *path, void **handle) {
	CK_C_GetFunctionList get;
	CK_FUNCTION_LIST_PTR list = NULL;
	*handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
	if (*handle == NULL) {
		return NULL;
	}
	get = (CK_C_GetFunctionList) dlsym(*handle, "C_GetFunctionList");
	if (get == NULL || get(&list) != CKR_OK || list == NULL) {
		dlclose(*handle);
		*handle = NULL;
		return NULL;
	}
	return list;
}

static void hw_close(void *handle) {
	if (handle != NULL) {
		dlclose(handle);
	}
}

static CK_RV hw_encrypt(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG inlen, CK_BYTE_PTR out, CK_ULONG_PTR outlen) {
	return f->C_Encrypt(s, in, inlen, out, outlen);
}

static CK_RV hw_decrypt(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG inlen, CK_BYTE_PTR out, CK_ULONG_PTR outlen) {
	return f->C_Decrypt(s, in, inlen, out, outlen);
}
*/
import "C"

import (
	"errors"
	"fmt"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// rawCtx is the module as hsm loads it: miekg/pkcs11's Ctx, plus the module's own
// CK_FUNCTION_LIST for the calls miekg cannot make the way real tokens need.
//
// miekg/pkcs11 v1.1.2's Encrypt and Decrypt (and the Update calls) always call the
// function twice: first with a NULL output buffer to learn the length, then with a
// buffer of that length. On the NSS softoken the length query of a CKM_AES_GCM
// encryption omits the tag, so the second call fails CKR_BUFFER_TOO_SMALL; on
// tpm2-pkcs11 the NULL-buffer C_Decrypt of CKM_AES_CBC_PAD is no pure query: it
// consumes CBC state, and the call after it returns CKR_OK with the wrong plaintext
// (docs/tokens.md). EncryptOnce and DecryptOnce make a single call with an output
// buffer whose size the caller computes from the mechanism, and never a length query.
//
// The function list comes from the module miekg loaded: the same path is opened again
// with RTLD_NOLOAD (a second reference to the same loaded library, never another copy)
// and its C_GetFunctionList is called. The reference is dropped in Destroy.
type rawCtx struct {
	*pkcs11.Ctx
	handle unsafe.Pointer
	fl     C.CK_FUNCTION_LIST_PTR
}

var _ p11 = (*rawCtx)(nil)

// newRawCtx wraps c, which miekg loaded from path.
func newRawCtx(path string, c *pkcs11.Ctx) (*rawCtx, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var handle unsafe.Pointer
	fl := C.hw_function_list(cpath, &handle)
	if fl == nil {
		return nil, fmt.Errorf("hsm: cannot get the CK_FUNCTION_LIST of module %q again (dlopen RTLD_NOLOAD or C_GetFunctionList failed)", path)
	}
	return &rawCtx{Ctx: c, handle: handle, fl: fl}, nil
}

// Destroy unloads the module: miekg's reference and ours.
func (r *rawCtx) Destroy() {
	r.Ctx.Destroy()
	C.hw_close(r.handle)
	r.handle, r.fl = nil, nil
}

// errOutputTooSmall marks a single-call C_Encrypt or C_Decrypt whose output did not fit
// the buffer hwkms sized for the mechanism.
var errOutputTooSmall = errors.New("output larger than the buffer sized for the mechanism")

// EncryptOnce calls C_Encrypt once, with in and an output buffer of outLen bytes, in
// an encryption that C_EncryptInit started on sh. It returns the output or the CK_RV
// as a pkcs11.Error. CKR_BUFFER_TOO_SMALL is not retried (the call may have consumed
// the operation's state on some tokens): it is returned, wrapped with errOutputTooSmall
// and the length the module asked for; the operation may then still be active in sh
// (PKCS#11 v2.40 section 5.2), so the caller should not reuse the session for another
// C_EncryptInit without expecting CKR_OPERATION_ACTIVE.
func (r *rawCtx) EncryptOnce(sh pkcs11.SessionHandle, in []byte, outLen int) ([]byte, error) {
	return r.once("C_Encrypt", sh, in, outLen, false)
}

// DecryptOnce is EncryptOnce for C_Decrypt. On any error the output buffer, which
// may hold plaintext, is cleared before it is dropped.
func (r *rawCtx) DecryptOnce(sh pkcs11.SessionHandle, in []byte, outLen int) ([]byte, error) {
	return r.once("C_Decrypt", sh, in, outLen, true)
}

func (r *rawCtx) once(op string, sh pkcs11.SessionHandle, in []byte, outLen int, decrypt bool) ([]byte, error) {
	if r.fl == nil {
		return nil, fmt.Errorf("hsm: %s after the module was unloaded: %w", op, pkcs11.Error(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED))
	}
	if outLen <= 0 {
		return nil, fmt.Errorf("hsm: %s: output buffer size %d: %w", op, outLen, pkcs11.Error(pkcs11.CKR_ARGUMENTS_BAD))
	}
	// Go memory without Go pointers may be passed to C for the duration of the call;
	// the module does not keep it. The output is Go memory too, so there is no C
	// allocation to free.
	out := make([]byte, outLen)
	var inPtr C.CK_BYTE_PTR
	if len(in) > 0 {
		inPtr = (C.CK_BYTE_PTR)(unsafe.Pointer(&in[0]))
	}
	n := C.CK_ULONG(outLen)
	var rv C.CK_RV
	if decrypt {
		rv = C.hw_decrypt(r.fl, C.CK_SESSION_HANDLE(sh), inPtr, C.CK_ULONG(len(in)), (C.CK_BYTE_PTR)(unsafe.Pointer(&out[0])), &n)
	} else {
		rv = C.hw_encrypt(r.fl, C.CK_SESSION_HANDLE(sh), inPtr, C.CK_ULONG(len(in)), (C.CK_BYTE_PTR)(unsafe.Pointer(&out[0])), &n)
	}
	switch {
	case rv == C.CKR_BUFFER_TOO_SMALL:
		clear(out)
		return nil, fmt.Errorf("hsm: %s: %w (%d bytes; the module asks for %d), not retried: %w", op, errOutputTooSmall, outLen, uint64(n), pkcs11.Error(rv))
	case rv != C.CKR_OK:
		clear(out)
		return nil, pkcs11.Error(rv)
	case uint64(n) > uint64(outLen):
		clear(out)
		return nil, fmt.Errorf("hsm: %s returned CKR_OK with a length of %d bytes for a %d-byte buffer: %w", op, uint64(n), outLen, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR))
	}
	if int(n) < outLen {
		clear(out[n:]) // nothing secret should be there, but the caller gets only out[:n]
	}
	return out[:n], nil
}
