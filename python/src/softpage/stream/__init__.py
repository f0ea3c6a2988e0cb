"""The Xen migration stream v2: wire formats, writer, strict reader, a model
of the stock 4.17 receiver, and the ``xl migrate`` handshake.

Submodules: ``records`` (every wire format once), ``writer``
(``StreamWriter``), ``reader`` (``StreamParser``, ``read_records``,
``StreamFeeder``), ``receiver`` (``RestoreModel``), ``handshake`` (the sender
side of ``xl migrate-receive``'s protocol).
"""
