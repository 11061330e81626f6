"""client.py whose evaluation takes an hour (for the tests): the noised model sits at it while the server is killed.

python slow_client.py CLIENT_FLAGS...   (client.py's own flags)
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import client

client.CifarClient.evaluate = lambda self, parameters, config: time.sleep(3600)  # the model is out, and stays out

if __name__ == "__main__":
    sys.argv[0] = "client.py"
    client.main()
