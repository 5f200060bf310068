// Only in the prebuilt binary (binding.gyp, VATTENTION_PORTABLE=1): lets a
// binary linked against a new glibc load on glibc 2.28, the oldest that
// Node 20 runs on (docs/development.md, "The prebuilt binary").
//
// glibc 2.34 moved libpthread and libdl into libc and gave their functions
// new symbol versions; a program linked there asks for those versions and
// fails to load on an older glibc, although the functions have been there
// since glibc's first x86_64 (2.2.5) and aarch64 (2.17) releases. The link
// wraps each such function (-Wl,--wrap=NAME: every reference, ours and the
// statically linked libstdc++'s, goes to __wrap_NAME), and the wrapper calls
// the function at its oldest version, which every glibc still exports.
#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>

#if defined(__x86_64__)
#define VAT_GLIBC_BASE "GLIBC_2.2.5"
#elif defined(__aarch64__)
#define VAT_GLIBC_BASE "GLIBC_2.17"
#else
#error "the portable build knows the base glibc version of x86_64 and aarch64 only"
#endif

// `real_NAME` is a reference to NAME at the base version.
#define VAT_AT_BASE(name) __asm__(".symver real_" #name "," #name "@" VAT_GLIBC_BASE)

extern "C" {

// libstdc++'s atomics ask whether the process has one thread (glibc 2.32's
// __libc_single_threaded). Our own definition answers "no": reference
// counts always use atomic operations, which is right whatever glibc says.
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

int real_pthread_create(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
int real_pthread_join(pthread_t, void**);
int real_pthread_detach(pthread_t);
int real_pthread_once(pthread_once_t*, void (*)());
int real_pthread_key_create(pthread_key_t*, void (*)(void*));
int real___pthread_key_create(pthread_key_t*, void (*)(void*));
int real_pthread_key_delete(pthread_key_t);
void* real_pthread_getspecific(pthread_key_t);
int real_pthread_setspecific(pthread_key_t, const void*);
int real_pthread_mutex_trylock(pthread_mutex_t*);
void* real_dlopen(const char*, int);
void* real_dlsym(void*, const char*);
int real_dladdr(const void*, Dl_info*);
char* real_dlerror();
VAT_AT_BASE(pthread_create);
VAT_AT_BASE(pthread_join);
VAT_AT_BASE(pthread_detach);
VAT_AT_BASE(pthread_once);
VAT_AT_BASE(pthread_key_create);
VAT_AT_BASE(__pthread_key_create);
VAT_AT_BASE(pthread_key_delete);
VAT_AT_BASE(pthread_getspecific);
VAT_AT_BASE(pthread_setspecific);
VAT_AT_BASE(pthread_mutex_trylock);
VAT_AT_BASE(dlopen);
VAT_AT_BASE(dlsym);
VAT_AT_BASE(dladdr);
VAT_AT_BASE(dlerror);

int __wrap_pthread_create(pthread_t* t, const pthread_attr_t* a, void* (*f)(void*), void* arg) {
  return real_pthread_create(t, a, f, arg);
}
int __wrap_pthread_join(pthread_t t, void** r) { return real_pthread_join(t, r); }
int __wrap_pthread_detach(pthread_t t) { return real_pthread_detach(t); }
int __wrap_pthread_once(pthread_once_t* o, void (*f)()) { return real_pthread_once(o, f); }
int __wrap_pthread_key_create(pthread_key_t* k, void (*d)(void*)) { return real_pthread_key_create(k, d); }
int __wrap___pthread_key_create(pthread_key_t* k, void (*d)(void*)) { return real___pthread_key_create(k, d); }
int __wrap_pthread_key_delete(pthread_key_t k) { return real_pthread_key_delete(k); }
void* __wrap_pthread_getspecific(pthread_key_t k) { return real_pthread_getspecific(k); }
int __wrap_pthread_setspecific(pthread_key_t k, const void* v) { return real_pthread_setspecific(k, v); }
int __wrap_pthread_mutex_trylock(pthread_mutex_t* m) { return real_pthread_mutex_trylock(m); }
void* __wrap_dlopen(const char* file, int mode) { return real_dlopen(file, mode); }
void* __wrap_dlsym(void* handle, const char* name) { return real_dlsym(handle, name); }
int __wrap_dladdr(const void* at, Dl_info* info) { return real_dladdr(at, info); }
char* __wrap_dlerror() { return real_dlerror(); }

// std::random_device's source in libstdc++ (arc4random, glibc 2.36):
// getentropy (glibc 2.25) gives the same kernel randomness.
uint32_t __wrap_arc4random() {
  uint32_t v = 0;
  while (getentropy(&v, sizeof v) != 0 && errno == EINTR) {
  }
  return v;
}

}  // extern "C"
