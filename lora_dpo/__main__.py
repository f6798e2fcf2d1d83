import sys

from lora_dpo.cli import main

sys.exit(main())
