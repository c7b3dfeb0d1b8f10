"""``python -m nova_flavor_sync.demo``: load the demo nova_api database."""

import sys

from nova_flavor_sync.demo import main

sys.exit(main())
