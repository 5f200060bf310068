{
  # Native sources are listed once, in native/sources.txt, for both
  # node-gyp (here) and cmake-js (CMakeLists.txt).
  "targets": [
    {
      "target_name": "vattention",
      "sources": ["<!@(node -p \"require('fs').readFileSync('native/sources.txt','utf8').split(/\\s+/).filter(Boolean).join(' ')\")"],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "native",
        # Only for the compile-time check of our CUDA declarations
        # (native/driver/cuda_types_check.cc); nothing links libcuda.
        "<!(node -p \"process.env.CUDA_PATH ? process.env.CUDA_PATH + '/include' : '/usr/local/cuda/include'\")"
      ],
      # NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS: a call that fails while a worker
      # thread is being terminated must not throw a C++ exception out of the
      # callback (std::terminate); the environment is going away anyway.
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED", "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "libraries": ["-ldl"],
      # Never unloaded: Node unloads an addon when the last worker thread
      # that loaded it exits, but the addon keeps process-wide state (the
      # driver library it opened, the shared default budgets, leaked
      # singletons that threads still running may touch).
      "ldflags": ["-Wl,-z,nodelete"],
      "conditions": [
        # The prebuilt binary (npm run prebuild): loads on glibc >= 2.28 with
        # any libstdc++ (docs/development.md, "The prebuilt binary").
        ["'<!(node -p \"process.env.VATTENTION_PORTABLE || ''\")'=='1'", {
          "sources": ["native/common/glibc_floor.cc"],
          "ldflags": ["-static-libstdc++", "-Wl,--wrap=pthread_create", "-Wl,--wrap=pthread_join", "-Wl,--wrap=pthread_detach", "-Wl,--wrap=pthread_once", "-Wl,--wrap=pthread_key_create", "-Wl,--wrap=__pthread_key_create", "-Wl,--wrap=pthread_key_delete", "-Wl,--wrap=pthread_getspecific", "-Wl,--wrap=pthread_setspecific", "-Wl,--wrap=pthread_mutex_trylock", "-Wl,--wrap=dlopen", "-Wl,--wrap=dlsym", "-Wl,--wrap=dladdr", "-Wl,--wrap=dlerror", "-Wl,--wrap=arc4random"]
        }],
        ["'<!(node -p \"process.env.VATTENTION_SANITIZE || ''\")'=='1'", {
          "cflags_cc": ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"],
          "ldflags": ["-fsanitize=address,undefined"]
        }],
        ["'<!(node -p \"process.env.VATTENTION_TSAN || ''\")'=='1'", {
          "cflags_cc": ["-fsanitize=thread", "-fno-omit-frame-pointer", "-g"],
          "ldflags": ["-fsanitize=thread"]
        }]
      ]
    }
  ]
}
