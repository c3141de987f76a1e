"""Error numbers the driver core returns, as negative ints like the kernel's.

Standard values come from :mod:`errno`; ``EPROBE_DEFER`` is kernel-internal (never reaches user
space), so Python does not know it.
"""

from __future__ import annotations

import errno

EPROBE_DEFER = 517


def errname(ret: int) -> str:
    """``-517`` -> ``"-EPROBE_DEFER"``, ``0`` -> ``"0"``: readable return codes for traces."""
    code = abs(ret)
    name = "EPROBE_DEFER" if code == EPROBE_DEFER else errno.errorcode.get(code, str(code))
    if ret < 0:
        return "-" + name
    return name if ret else "0"
