from biofm.platform.cli import main

main()
