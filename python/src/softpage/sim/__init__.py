"""The simulator: a guest, its softpage module, and a backend the driver cannot tell from Xen.

* ``guest``: ``SimGuest`` (memory, kernel bookkeeping, the module's reports
  in the real binary format, and the ways they go wrong);
* ``backend``: ``SimBackend`` / ``SimSoftChannel``, the ``MigrationBackend``
  and ``SoftPageChannel`` protocols;
* ``destination``: the stock receiver's rules (``DestinationMemory``) and the
  fast ``DirectSink``; ``stream``: ``RestoreSink`` through the real stream
  writer, reader and ``RestoreModel``;
* ``link``, ``workload``: the cost model and guest activity in simulated time;
* ``experiment``: whole migrations and the SonicMigration-shaped sweep.
"""
