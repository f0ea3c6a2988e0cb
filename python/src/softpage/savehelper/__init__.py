"""softpage inside libxl: a replacement for ``libxl-save-helper`` (``LIBXL_SAVE_HELPER``).

``protocol`` is the helper's message protocol, ``helper`` the save it runs; the executable is
``softpage.cli.save_helper``.
"""
