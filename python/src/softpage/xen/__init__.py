"""The real Xen side of softpage: bindings to the Xen 4.17 tool libraries.

Layers, none of which leaks into the one above it:

* ``softpage._cffi_build.build_xen`` (build time only) compiles ``softpage._xen``;
* ``softpage.xen._binding`` loads it, checks its build stamp and turns a failed
  call's errno into ``OSError(errno, strerror, "<call> dom <d> pfn <p>")``;
* ``ctrl``, ``foreignmemory``, ``gnttab``, ``evtchn``: Pythonic handles;
* ``backend`` and ``channel``: ``softpage.backend.MigrationBackend`` and
  ``SoftPageChannel`` on a live domain; ``suspend``: the libxl suspend protocol.

Importing this package does nothing; the compiled module is loaded on the first
handle opened, so the rest of softpage works where ``_xen`` was not built.
"""
