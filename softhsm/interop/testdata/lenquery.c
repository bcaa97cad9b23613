/*
 * lenquery: what a PKCS#11 module's C_Encrypt/C_Decrypt length queries return,
 * with direct calls (miekg/pkcs11 always queries with a NULL buffer first).
 * Used for docs/tokens.md. Build (headers from miekg/pkcs11 in the module cache):
 *
 *   M=$(go env GOMODCACHE)/github.com/miekg/pkcs11@v1.1.2
 *   gcc -I"$M" -o /tmp/lenquery softhsm/interop/testdata/lenquery.c -ldl
 *
 * Run: lenquery MODULE INITARGS|- SLOT PIN gcm|cbcpad [KEYLABEL]
 * Without KEYLABEL it generates a session AES-256 key. NOQUERY=1 skips the
 * C_Decrypt length query.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dlfcn.h>
#define CK_PTR *
#define CK_DECLARE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION_POINTER(returnType, name) returnType (* name)
#define CK_CALLBACK_FUNCTION(returnType, name) returnType (* name)
#ifndef NULL_PTR
#define NULL_PTR 0
#endif
#include <pkcs11.h>
int main(int argc, char **argv) {
  void *h = dlopen(argv[1], RTLD_NOW); CK_C_GetFunctionList gfl = dlsym(h, "C_GetFunctionList");
  CK_FUNCTION_LIST_PTR f; gfl(&f);
  CK_C_INITIALIZE_ARGS ia; memset(&ia, 0, sizeof ia); ia.flags = CKF_OS_LOCKING_OK;
  if (strcmp(argv[2], "-")) ia.pReserved = argv[2];
  printf("init %lx\n", f->C_Initialize(&ia));
  CK_SLOT_ID slot = atoi(argv[3]); CK_SESSION_HANDLE s;
  printf("open %lx\n", f->C_OpenSession(slot, CKF_SERIAL_SESSION|CKF_RW_SESSION, NULL, NULL, &s));
  printf("login %lx\n", f->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)argv[4], strlen(argv[4])));
  CK_OBJECT_HANDLE key = 0;
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY; CK_KEY_TYPE kt = CKK_AES; CK_ULONG vl = 32; CK_BBOOL tr = 1, fa = 0;
  if (argc > 6) { /* find by label */
    CK_ATTRIBUTE ft[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, argv[6], strlen(argv[6])}}; CK_ULONG n;
    f->C_FindObjectsInit(s, ft, 2); f->C_FindObjects(s, &key, 1, &n); f->C_FindObjectsFinal(s); printf("found %lu\n", n);
  } else {
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_KEY_TYPE, &kt, sizeof kt}, {CKA_VALUE_LEN, &vl, sizeof vl},
      {CKA_TOKEN, &fa, 1}, {CKA_ENCRYPT, &tr, 1}, {CKA_DECRYPT, &tr, 1}, {CKA_SENSITIVE, &tr, 1}};
    CK_MECHANISM g = {CKM_AES_KEY_GEN, NULL, 0};
    printf("gen %lx\n", f->C_GenerateKey(s, &g, t, 7, &key));
  }
  unsigned char iv[16] = {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16}, aad[3] = "aad", pt[29] = "hwkms interop probe plaintex", ct[128], back[128];
  CK_GCM_PARAMS gp = {iv, 12, 96, aad, 3, 128};
  CK_MECHANISM m;
  if (!strcmp(argv[5], "gcm")) { m.mechanism = CKM_AES_GCM; m.pParameter = &gp; m.ulParameterLen = sizeof gp; }
  else { m.mechanism = CKM_AES_CBC_PAD; m.pParameter = iv; m.ulParameterLen = 16; }
  CK_ULONG n = 0;
  printf("encinit %lx\n", f->C_EncryptInit(s, &m, key));
  CK_RV rv = f->C_Encrypt(s, pt, 29, NULL, &n); printf("enc query rv %lx len %lu (plaintext 29)\n", rv, n);
  n = sizeof ct; rv = f->C_Encrypt(s, pt, 29, ct, &n); printf("enc sized rv %lx len %lu\n", rv, n);
  CK_ULONG cn = n, bn = 0;
  printf("decinit %lx\n", f->C_DecryptInit(s, &m, key));
  if (!getenv("NOQUERY")) { rv = f->C_Decrypt(s, ct, cn, NULL, &bn); printf("dec query rv %lx len %lu (ciphertext %lu)\n", rv, bn, cn); }
  bn = sizeof back; rv = f->C_Decrypt(s, ct, cn, back, &bn); printf("dec sized rv %lx len %lu ok=%d\n", rv, bn, bn == 29 && !memcmp(back, pt, 29));
  return 0;
}
