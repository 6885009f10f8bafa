from lit_iiet.cli import main

main()
