"""Model families of erf-tools, registered with timm on import (``timm.create_model("uniconvnet_t")``)."""
from erf_tools.models import (  # noqa: F401  (registration side effects)
    conv2former,
    parc,
    replknet,
    slak,
    uniconvnet,
    unireplknet,
)
