import sys

from nova_flavor_sync.cli import main

sys.exit(main())
