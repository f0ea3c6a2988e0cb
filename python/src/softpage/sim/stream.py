"""``RestoreSink``: the driver's pages through the real stream writer into ``RestoreModel``.

The end-to-end destination of the safety model: every batch becomes PAGE_DATA
records (``softpage.stream.writer.StreamWriter``), is parsed back by the
strict reader and applied by the stream package's model of the stock 4.17
receiver (``softpage.stream.receiver.RestoreModel``). It keeps a full copy of
every populated page, so it is meant for small guests; ``DirectSink`` is the
fast path for large ones.
"""

from __future__ import annotations

import json

import numpy as np
import numpy.typing as npt

from softpage.backend import DomainInfo, EndOfCheckpoint, StaticInfo
from softpage.errors import StreamError
from softpage.pfnset import PfnArray
from softpage.sender import XlStreamSink
from softpage.stream.receiver import RestoreModel
from softpage.stream.writer import StreamWriter


class RestoreSink(XlStreamSink):
    """``PageSink`` writing an xl stream that ``RestoreModel`` restores as it arrives."""

    def __init__(self, fresh_fill: int = 0) -> None:
        self.model = RestoreModel(fresh_fill)
        super().__init__(StreamWriter(self.model.sink().writev), config_json=b"")
        self.ended = False

    def begin(self, domain: DomainInfo, static: StaticInfo) -> None:
        config = json.dumps({"c_info": {"name": domain.name, "type": domain.guest_type.value}})
        self.config_json = config.encode()
        super().begin(domain, static)

    def end(self, end_of_checkpoint: EndOfCheckpoint) -> None:
        super().end(end_of_checkpoint)
        self.model.complete()
        self.ended = True

    def populated(self, p2m_size: int) -> npt.NDArray[np.bool_]:
        """Which PFNs of ``[0, p2m_size)`` the receiver populated."""
        mask = np.zeros(p2m_size, dtype=bool)
        pfns = self.model.populated_pfns()
        if pfns.size and int(pfns[-1]) >= p2m_size:
            raise StreamError(f"restore: expected PFNs below {p2m_size}, got {int(pfns[-1])} populated")
        mask[pfns.astype(np.intp)] = True
        return mask

    def tokens(self, pfns: PfnArray) -> npt.NDArray[np.uint64]:
        """The content token (first word) of each populated PFN in ``pfns``."""
        if pfns.size == 0:
            return np.zeros(0, dtype=np.uint64)
        pages = self.model.pages(pfns)
        return np.ascontiguousarray(pages[:, :8]).view("<u8").reshape(-1).astype(np.uint64)
